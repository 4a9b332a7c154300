"""The GPU record: train speed, Dice at equal steps and a federation slice at 128³, in one timed run.

Run through ``benchmarks/gpu_record.sh`` (which checks the packages first). Phases, each with a
share of one global time budget (``--budget-s``, default 450 s); whatever has finished is written
to ``benchmarks/results/gpu-record.json`` (and ``$OUT/gpu-record.json`` when ``$OUT`` is set)
after every phase, so a run cut short still leaves a record:

1. **environment** — device name, torch / CUDA / cuDNN / MONAI versions;
2. **speed** (share 0.25) — per network (``transformer_unet`` = our default, ``unet``, ``unetr``,
   ``swin_unetr``, all from ``model.build_model``): GFLOP of one training step (forward +
   backward, ``torch.utils.flop_counter`` on the meta device), parameters, volumes/s of training
   steps (forward + Dice/CE loss + backward + Adam, bf16 autocast, random data) after warm-up,
   peak memory; ratios of ours to UNETR and SwinUNETR;
3. **Dice at equal steps** (share 0.25) — every network trains the same number of steps (as many
   as the measured speeds fit into the share) on the federation's generated site data, pooled,
   and is scored (mean foreground Dice) on the held-out cases (``dice_equal_steps.train_curve``);
   the data are generated first (the generator the configuration names, as ``fedseg make-data``
   does: ``gpu-128.toml`` takes the randomized whole-brain tissue sites of ``experiments.synth``;
   with the federation's parameters, so the federation then reuses them) and resampled to 128³
   by the sites' pipeline;
4. **federation** (the rest) — ``experiments.simulate.run_simulation`` (what ``fedseg simulate``
   runs) with ``experiments/configs/gpu-128.toml``: 5 sites, 128³, FedSegNet, the real aggregator
   and agents, as many rounds as fit; resumable (run again with the same ``--workdir``); seconds
   per round split into train / download / validate+encode+upload / close, with the encoding of a
   real update timed here.

``--smoke``: the same code end to end on the CPU at tiny sizes (small baselines, a 2-site
federation at 32³, one round), in about two minutes; a test runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from codec import atomic_write_text  # noqa: E402

OURS = "transformer_unet"
MODELS: tuple[str, ...] = (OURS, "unet", "unetr", "swin_unetr")
RESULT_NAME = "gpu-record.json"
CONFIG = REPO / "experiments" / "configs" / "gpu-128.toml"
SHARES = {"speed": 0.25, "dice": 0.25}  # the federation gets what is left
MB = 1 << 20

# --smoke: small baselines (the project's defaults at 128³ would take minutes per step on a CPU);
# ours keeps its default, which is what the record is about. 32 x 32 x 64 suits every network
# (SwinUNETR downsamples by 32 and needs more than one voxel at its deepest level).
SMOKE_OPTIONS: dict[str, dict[str, Any]] = {
    OURS: {},
    "unet": {"channels": (4, 8, 16), "strides": (2, 2)},
    "unetr": {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
    "swin_unetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
}
SMOKE_SHAPE = (32, 32, 64)


class Budget:
    """One global time budget; each phase gets a share of what is left when it starts."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def deadline(self, share: float) -> float:
        """A ``time.monotonic()`` deadline ``share`` of the remaining budget away."""
        return time.monotonic() + max(0.0, self.left()) * share


class Record:
    """The JSON record, written after every phase (to the results folder and to ``$OUT``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"benchmark": "gpu_record", "phases": {}}

    def write(self) -> None:
        text = json.dumps(_clean(self.data), indent=1, sort_keys=True, default=_json_default, allow_nan=False) + "\n"
        atomic_write_text(self.path, text)
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / self.path.name).write_text(text)

    def phase(self, name: str, started: float, status: str, **extra: Any) -> None:
        self.data["phases"][name] = {"status": status, "seconds": round(time.monotonic() - started, 1), **extra}
        self.write()


def _clean(value: Any) -> Any:
    # NaN / inf (an undefined HD95, say) become null: the record is strict JSON.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _finite(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


# ----------------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict[str, Any]:
    import monai

    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
    return env


# ----------------------------------------------------------------------------------------- speed


def build(name: str, shape: Sequence[int], *, in_channels: int, classes: int, smoke: bool) -> torch.nn.Module:
    from model import build_model

    options = SMOKE_OPTIONS[name] if smoke else {}
    return build_model(name, in_channels=in_channels, out_channels=classes, img_size=tuple(shape), **options)


def count_gflop(name: str, shape: Sequence[int], *, batch: int, in_channels: int, classes: int, smoke: bool) -> float | None:
    """GFLOP of one forward + backward, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        net = build(name, shape, in_channels=in_channels, classes=classes, smoke=smoke).to("meta")
        x = torch.empty(batch, in_channels, *shape, device="meta")
        with FlopCounterMode(display=False) as counter:
            net(x).float().sum().backward()
        return counter.get_total_flops() / 1e9
    except (RuntimeError, NotImplementedError, ValueError):
        return None


def time_model(
    name: str, shape: Sequence[int], *, device: torch.device, batch: int, warmup: int, max_steps: int,
    deadline: float, in_channels: int, classes: int, smoke: bool,
) -> dict[str, Any]:
    """Volumes/s of training steps after ``warmup`` untimed ones, up to ``max_steps`` or ``deadline``."""
    from model import DiceCELoss

    torch.manual_seed(0)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    net = build(name, shape, in_channels=in_channels, classes=classes, smoke=smoke).to(device).train()
    params = sum(p.numel() for p in net.parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(lambda_dice=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, *shape, generator=g).to(device)
    y = torch.randint(0, classes, (batch, 1, *shape), generator=g).to(device)
    amp = device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()

    out: dict[str, Any] = {"params": params}
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        out["warmup_s"] = round(time.perf_counter() - t0, 2)
        times: list[float] = []
        while len(times) < max_steps and (not times or time.monotonic() < deadline):
            t = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t)
    except torch.cuda.OutOfMemoryError as exc:
        return {**out, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    out.update(
        steps=len(times),
        step_ms=round(1000 * statistics.median(times), 2),
        vol_per_s=round(batch * len(times) / sum(times), 3),
        peak_mem_mb=round(torch.cuda.max_memory_allocated(device) / MB) if device.type == "cuda" else None,
    )
    del net, optimizer, x, y
    gc.collect()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def phase_speed(rec: Record, budget: Budget, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Fill ``models``, ``vol_per_s``, ``gflop_per_step`` and the ratios; return step seconds per network."""
    started = time.monotonic()
    deadline_all = budget.deadline(SHARES["speed"])
    models: dict[str, Any] = rec.data.setdefault("models", {})
    step_s: dict[str, float] = {}
    for i, name in enumerate(args.models):
        print(f"[speed] {name}", flush=True)
        # each remaining network gets an equal part of what is left of the share
        deadline = time.monotonic() + max(1.0, (deadline_all - time.monotonic()) / (len(args.models) - i))
        entry: dict[str, Any] = {"gflop_per_step": _finite(count_gflop(
            name, args.shape, batch=args.batch, in_channels=args.in_channels, classes=args.classes, smoke=args.smoke), 1)}
        try:
            entry.update(time_model(name, args.shape, device=device, batch=args.batch, warmup=args.warmup,
                                    max_steps=args.max_steps, deadline=deadline, in_channels=args.in_channels,
                                    classes=args.classes, smoke=args.smoke))
        except Exception as exc:  # noqa: BLE001 - one network failing must not lose the others' figures
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        models[name] = entry
        if "vol_per_s" in entry:
            step_s[name] = args.batch / entry["vol_per_s"]
        _speed_summary(rec)
        rec.write()
    rec.phase("speed", started, "done")
    return step_s


def _speed_summary(rec: Record) -> None:
    models = rec.data["models"]
    vps = {k: v.get("vol_per_s") for k, v in models.items()}
    rec.data["vol_per_s"] = vps
    rec.data["gflop_per_step"] = {k: v.get("gflop_per_step") for k, v in models.items()}
    rec.data["params"] = {k: v.get("params") for k, v in models.items()}
    rec.data["peak_mem_mb"] = {k: v.get("peak_mem_mb") for k, v in models.items()}
    rec.data["ratio_vs_unetr"] = _ratio(vps.get(OURS), vps.get("unetr"))
    rec.data["ratio_vs_swin_unetr"] = _ratio(vps.get(OURS), vps.get("swin_unetr"))
    rec.data["ratio_vs_unet"] = _ratio(vps.get(OURS), vps.get("unet"))


# ------------------------------------------------------------------------------------------ Dice


def fast_dice(net: torch.nn.Module, test: Sequence[dict[str, torch.Tensor]], *, device: torch.device, classes: int) -> float:
    """Mean over held-out cases of the mean foreground Dice (a class absent from both counts as 1)."""
    net.eval()
    scores = []
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for case in test:
            pred = net(case["image"].to(device)).float().argmax(1)
            target = case["label"].to(device)[:, 0]
            per = []
            for c in range(1, classes):
                p, t = pred == c, target == c
                denom = int(p.sum() + t.sum())
                per.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
            scores.append(sum(per) / len(per))
    net.train()
    return float(sum(scores) / len(scores))


def phase_data(rec: Record, args: argparse.Namespace, sim: Any) -> Any:
    """Generate the federation's site data (reused by the federation phase: same parameters, same
    folder) and preprocess it to the training grid for the Dice phase."""
    from dice_equal_steps import load_sites

    from experiments.simulate import TASK_LABEL_MAPS

    started = time.monotonic()
    print(f"[data] generating / loading {sim.sites} sites ({sim.generator} generator, {sim.task}, {sim.size}³ at "
          f"{sim.spacing_mm} mm)", flush=True)
    data = load_sites(args.workdir / "federation" / "data", size=args.shape, gen_size=sim.size, sites=sim.sites,
                      cases_per_site=sim.cases_per_site, test_cases=sim.test_cases, task=sim.task, seed=sim.seed,
                      spacing_mm=sim.spacing_mm, label_map=TASK_LABEL_MAPS[sim.task], max_test=args.test_cases,
                      generator=sim.generator)
    rec.phase("data", started, "done", train_cases=int(data.train_x.shape[0]), test_cases=len(data.test),
              generated_size=sim.size, spacing_mm=sim.spacing_mm, task=sim.task, generator=sim.generator)
    return data


def phase_dice(rec: Record, budget: Budget, device: torch.device, args: argparse.Namespace,
               step_s: dict[str, float], data: Any) -> None:
    """Every network trains the same number of steps on the federation's pooled site data."""
    from dice_equal_steps import summarize, train_curve

    started = time.monotonic()
    deadline = budget.deadline(SHARES["dice"] / (1 - SHARES["speed"]))
    runnable = [m for m in args.models if m in step_s]
    left = deadline - time.monotonic()
    # About 30% of a network's time goes to building it, cuDNN's first-step tuning and scoring.
    per_round = sum(step_s[m] for m in runnable) or 1.0
    steps = max(1, min(args.max_dice_steps, int(0.7 * left / per_round)))
    print(f"[dice] {steps} steps per network ({left:.0f} s left of the share)", flush=True)
    results: dict[str, Any] = {}
    for name in runnable:
        try:
            results[name] = train_curve(
                name, data, steps=steps, batch=args.batch, lr=args.dice_lr, device=device, amp=device.type == "cuda",
                deadline=deadline + 30, points=sorted({max(1, steps // 2), steps}),
                scorer=lambda net, d: fast_dice(net, d.test, device=device, classes=d.num_classes),
                options=SMOKE_OPTIONS[name] if args.smoke else None,
            )
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        rec.data["dice_equal_steps"] = {"steps": steps, "batch": args.batch, "lr": args.dice_lr, "size": list(args.shape),
                                        "train_cases": int(data.train_x.shape[0]), "test_cases": len(data.test),
                                        "models": results, **summarize(results)}
        rec.write()
    rec.phase("dice", started, "done")


# ------------------------------------------------------------------------------------ federation


def _agent_events(logdir: Path) -> dict[str, list[dict[str, Any]]]:
    events: dict[str, list[dict[str, Any]]] = {}
    for log in sorted(logdir.glob("agent-*.log")):
        rows = []
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
        events[log.stem.removeprefix("agent-")] = rows
    return events


def round_timings(logdir: Path, close_seconds: dict[int, float]) -> list[dict[str, Any]]:
    """Seconds per round from the agents' JSON logs (max over sites) and the aggregator's close time.

    Per site and round: ``download`` = from the start of the round's work (the ``round`` event's
    time minus its ``seconds``) to the ``download`` event; ``train`` = the sum of the round's
    ``epoch`` events; ``validate_encode_upload`` = from the last epoch to the ``round`` event (the
    agent reports no finer split). ``close`` is the aggregator's ``close_seconds``.
    """
    per_round: dict[int, dict[str, list[float]]] = {}
    for _site, rows in _agent_events(logdir).items():
        by_round: dict[int, dict[str, Any]] = {}
        for ev in rows:
            r = ev.get("round")
            if not isinstance(r, int):
                continue
            slot = by_round.setdefault(r, {"epochs": []})
            if ev.get("event") == "download":
                slot["download_t"] = ev["time"]
            elif ev.get("event") == "epoch":
                slot["epochs"].append(ev)
            elif ev.get("event") == "round":
                slot["round"] = ev
        for r, slot in by_round.items():
            if "round" not in slot:
                continue
            end = slot["round"]["time"]
            start = end - slot["round"]["seconds"]
            acc = per_round.setdefault(r, {"train": [], "download": [], "validate_encode_upload": [], "site_round": []})
            acc["site_round"].append(slot["round"]["seconds"])
            if "download_t" in slot:
                acc["download"].append(slot["download_t"] - start)
            if slot["epochs"]:
                acc["train"].append(sum(e["seconds"] for e in slot["epochs"]))
                acc["validate_encode_upload"].append(end - slot["epochs"][-1]["time"])
    out = []
    for r in sorted(per_round):
        row: dict[str, Any] = {"round": r}
        for key, values in per_round[r].items():
            row[key] = round(max(values), 2) if values else None
        row["close"] = _finite(close_seconds.get(r), 3)
        out.append(row)
    return out


def time_encode(models_dir: Path, spec: Any) -> dict[str, Any] | None:
    """Encode a real update (the difference of the last two global models) with the federation's
    codec settings, timed here because the agent does not report its encoding time."""
    import numpy as np

    import codec

    frames = sorted(models_dir.glob("global-*.frames"))
    if len(frames) < 2:
        frames = [models_dir / "initial.frames", *frames] if (models_dir / "initial.frames").exists() else frames
    if len(frames) < 2:
        return None
    a = dict(codec.load_tensors(frames[-2]))
    b = dict(codec.load_tensors(frames[-1]))
    delta = [(k, (np.asarray(b[k], dtype=np.float32) - np.asarray(a[k], dtype=np.float32))) for k in b]
    t0 = time.perf_counter()
    encoded = codec.encode_update(delta, spec, {})
    nbytes = sum(len(f) for f in encoded.frames)  # inside the timing: frames may be produced lazily
    seconds = time.perf_counter() - t0
    return {"encode_s": round(seconds, 4), "bytes": nbytes, "from": [frames[-2].name, frames[-1].name]}


def phase_federation(rec: Record, budget: Budget, args: argparse.Namespace, config: Path) -> None:
    from experiments.simulate import RoundRow, load_simulation_config, run_simulation

    started = time.monotonic()
    workdir = args.workdir / "federation"
    summary_file = workdir / "summary.json"
    resume_rows: list[Any] = []
    if summary_file.exists() and not args.fresh:
        previous = json.loads(summary_file.read_text())
        if not previous.get("finished", True):
            resume_rows = [RoundRow(**r) for r in previous.get("rounds", [])]
    left = budget.left() - args.margin_s
    if args.smoke:
        left = max(left, 300.0)  # the smoke run exists to go through every phase, however slow the machine
    info: dict[str, Any] = {"config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
                            "workdir": str(workdir), "resumed_from_round": len(resume_rows)}
    rec.data["federation"] = info
    if left < 20:
        rec.phase("federation", started, "skipped: no time left", left_s=round(left, 1))
        return
    # Stop after the first round closing past ~60% of what is left (a round may overrun); a hard
    # limit at all of it stops the processes even in the middle of a round.
    print(f"[federation] {left:.0f} s left; resume from round {len(resume_rows)}", flush=True)
    status = "done"
    result = None
    try:
        result = run_simulation(config, workdir, fresh=not resume_rows, resume_rows=resume_rows,
                                stop_after_s=0.6 * left, timeout_s=left, stream=sys.stdout)
    except Exception as exc:  # noqa: BLE001 - a timed-out federation still leaves its logs
        status = f"stopped: {type(exc).__name__}: {exc}"
        traceback.print_exc()
    rows = list(result.rows) if result else list(resume_rows)
    close = {}
    with contextlib.suppress(Exception):
        close = _close_seconds(workdir, rows)
    info.update(
        rounds_done=len(rows),
        finished=bool(result and result.finished),
        local_epochs=load_simulation_config(config)[1].training.local_epochs,
        rounds=[{"round": r.round_id, "seconds": round(r.seconds, 2), "global_dice": _finite(r.global_metrics.get("dice")),
                 "bytes_up": r.bytes_up, "bytes_down": r.bytes_down} for r in rows],
        timings=round_timings(workdir / "logs", close),
    )
    with contextlib.suppress(Exception):
        info["encode_timed_here"] = time_encode(workdir / "models", load_simulation_config(config)[1].codec)
    rec.phase("federation", started, status)


def _close_seconds(workdir: Path, rows: Sequence[Any]) -> dict[int, float]:
    """The aggregator's close time per round, from the round results in its store
    (``<store>/…/_result.json``, key ``close_seconds``)."""
    out: dict[int, float] = {}
    for path in (workdir / "store").rglob("_result.json"):
        with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
            result = json.loads(path.read_text())
            out[int(result["round_id"])] = float(result["close_seconds"])
    return out


# ------------------------------------------------------------------------------------------- main


def smoke_config(workdir: Path) -> Path:
    """The GPU config shrunk for ``--smoke``: 2 sites of 2 cases at 32³, one round, on the CPU."""
    from experiments.simulate import dump_toml

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    data = tomllib.loads(CONFIG.read_text())
    # 32³ at 6 mm keeps the whole brain (192 mm) in view, as 64³ at 3 mm does
    data["simulation"].update(sites=2, cases_per_site=[2, 2], test_cases=1, size=32, spacing_mm=6.0)
    data["federation"].update(id="gpu-128-smoke", rounds=1, min_clients=2, max_clients=2, sites=["site-1", "site-2"],
                              round_timeout_s=300)
    data["model"]["img_size"] = [32, 32, 32]
    path = workdir / "smoke.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(data))
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, end to end (about 2 minutes)")
    parser.add_argument("--budget-s", type=float, help="global time budget in seconds (default 450; smoke 150)")
    parser.add_argument("--margin-s", type=float, default=15.0, help="kept free at the end for writing (default 15)")
    parser.add_argument("--workdir", help="data, federation store and logs (default /tmp/fedseg-gpu-record[-smoke])")
    parser.add_argument("--fresh", action="store_true", help="start the federation over instead of resuming it")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--phases", nargs="+", choices=("speed", "dice", "federation"),
                        default=["speed", "dice", "federation"])
    parser.add_argument("--out", help=f"record file (default benchmarks/results/{RESULT_NAME}; smoke: in the workdir)")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (150.0 if args.smoke else 450.0)
    args.workdir = Path(args.workdir or ("/tmp/fedseg-gpu-record-smoke" if args.smoke else "/tmp/fedseg-gpu-record"))
    args.shape = SMOKE_SHAPE if args.smoke else (128, 128, 128)
    args.batch = 1 if args.smoke else 2
    args.in_channels, args.classes = 4, 4
    args.warmup = 0 if args.smoke else 5
    args.max_steps = 1 if args.smoke else 30
    args.max_dice_steps = 1 if args.smoke else 600
    args.dice_lr = 1e-3
    args.test_cases = 1 if args.smoke else 4
    if args.out:
        args.out = Path(args.out)
    else:
        args.out = args.workdir / RESULT_NAME if args.smoke else REPO / "benchmarks" / "results" / RESULT_NAME
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    rec = Record(args.out)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels
    else:
        print("gpu_record: no CUDA device (torch.cuda.is_available() is False); use --smoke on a CPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    rec.data.update(mode="smoke" if args.smoke else "gpu", budget_s=args.budget_s, batch=args.batch,
                    size=list(args.shape), amp="bf16" if device.type == "cuda" else "fp32", models_order=list(args.models))
    rec.data.update(environment(device))
    rec.phase("environment", started, "done")
    config = smoke_config(args.workdir) if args.smoke else CONFIG
    from experiments.simulate import load_simulation_config

    sim = load_simulation_config(config)[0]
    if args.smoke and args.fresh is False and (args.workdir / "federation").exists():
        shutil.rmtree(args.workdir / "federation")  # the smoke run always starts over
    step_s: dict[str, float] = {}
    failed = False
    data = None
    for phase in ["data", *args.phases] if "dice" in args.phases else args.phases:
        t0 = time.monotonic()
        try:
            if phase == "data":
                data = phase_data(rec, args, sim)
            elif phase == "speed":
                step_s = phase_speed(rec, budget, device, args)
            elif phase == "dice":
                if data is None:
                    raise RuntimeError("no site data (the data phase failed)")
                if not step_s:  # no speed phase: assume equal step times
                    step_s = {m: 1.0 for m in args.models}
                phase_dice(rec, budget, device, args, step_s, data)
            else:
                phase_federation(rec, budget, args, config)
        except Exception as exc:  # noqa: BLE001 - record the failure and go on with the next phase
            failed = True
            traceback.print_exc()
            rec.phase(phase, t0, f"failed: {type(exc).__name__}: {exc}")
    rec.data["total_s"] = round(time.monotonic() - budget.start, 1)
    rec.write()
    print(summary_table(rec.data))
    print(f"record: {args.out}" + (f" (and $OUT/{RESULT_NAME})" if os.environ.get("OUT") else ""))
    return 1 if failed else 0


def summary_table(data: dict[str, Any]) -> str:
    """A Markdown table of the record for benchmarks/README.md."""
    dice = data.get("dice_equal_steps", {}).get("dice_at_equal_steps", {})
    lines = [f"# {data.get('device')}, torch {data.get('torch')}, CUDA {data.get('cuda')}, {data.get('date')}; "
             f"{'x'.join(map(str, data.get('size', [])))} batch {data.get('batch')} {data.get('amp')}",
             "| model | params M | GFLOP/step | vol/s | peak MB | ours / it | Dice @ equal steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    vps = data.get("vol_per_s", {})
    for name, m in data.get("models", {}).items():
        ratio = _ratio(vps.get(OURS), vps.get(name)) if name != OURS else None
        d = dice.get(name)
        lines.append(f"| {name} | {(m.get('params') or 0) / 1e6:.2f} | {m.get('gflop_per_step')} | {m.get('vol_per_s', m.get('error'))} | "
                     f"{m.get('peak_mem_mb')} | {'' if ratio is None else ratio} | {'' if d is None else f'{d:.3f}'} |")
    fed = data.get("federation", {})
    if fed.get("timings"):
        lines.append("")
        lines.append("| round | train s | download s | validate+encode+upload s | close s | round s |")
        lines.append("| ---: | ---: | ---: | ---: | ---: | ---: |")
        secs = {r["round"]: r["seconds"] for r in fed.get("rounds", [])}
        for t in fed["timings"]:
            lines.append(f"| {t['round']} | {t.get('train')} | {t.get('download')} | {t.get('validate_encode_upload')} | "
                         f"{t.get('close')} | {secs.get(t['round'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
