"""Dice at equal training steps and at equal wall time: FedSegNet's default against MONAI's baselines.

Every network trains the same number of Adam steps on the same generated site data — same seed,
same batches in the same order, same learning rate and batch size — and is scored on the held-out
test folder (a scanner no site saw) after several of those steps (step 0 = untrained, then about
1/8, 1/4, 1/2 and all of them). From the same run:

* **Dice at equal steps**: each network's Dice after the last step;
* **Dice at equal wall time**: each network's Dice at the last scoring point whose training time
  (scoring excluded) is within the time our default needed for all its steps. A network slower
  per step has then taken fewer steps.

Data (``--generator``): by default ``synth``, the randomized whole-brain sites of
``experiments.synth`` (``fedseg make-data --generator synth``: every case a new random geometry,
contrast, bias field, resolution and noise drawn from the MNI152 tissue maps), generated at 64³,
3 mm; ``profile`` takes the scanner-profile sites of ``experiments.sitedata`` (48³, 2 mm). Either
way 3 sites of 6 / 4 / 8 cases and 4 held-out cases, the tissue task (CSF / GM / WM, 1 channel),
pooled; preprocessed once with the sites' pipeline (z-score, resize to ``--size``) and held in
memory, so no network pays for loading.

Networks: built by ``model.build_model`` with the project's defaults (``transformer_unet`` ours,
``unet``, ``unetr``, ``swin_unetr``). SwinUNETR needs every side divisible by 32: at a size that
is not, it is listed as skipped with that reason rather than run at another size.

Usage::

    nice -n 10 python benchmarks/dice_equal_steps.py --json               # 48³, 40 steps, batch 1
    python benchmarks/dice_equal_steps.py --size 64 --steps 60 --batch 2 --json
    nice -n 10 python benchmarks/dice_equal_steps.py --steps 60 --resume --json  # after a kill: keeps what is done

With ``--json`` the last line is one JSON object (also written to ``--out``, default
``benchmarks/results/dice-equal-steps-<size>.json``, after each network, so a kill loses at most
the network in training): ``models`` (per network ``params``, ``step_s``, ``cpu_s`` (this
process's CPU seconds in the steps: wall time depends on the machine's load), ``curve`` = [{step,
train_s, dice}], ``dice``, ``hd95``), ``dice_at_equal_steps``, ``dice_at_equal_wall_time``,
``wall_time_s``, ``pending`` (networks not yet trained) and the machine and its load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model import DiceCELoss, build_model  # noqa: E402

OURS = "transformer_unet"
MODELS: tuple[str, ...] = (OURS, "unet", "unetr", "swin_unetr")
GENERATORS: tuple[str, ...] = ("profile", "synth")
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class SiteTensors:
    """Pooled training cases and held-out test cases, preprocessed, as tensors on the CPU.

    ``train_x``: float32 ``(N, C, D, H, W)``; ``train_y``: int64 ``(N, 1, D, H, W)``; ``test``: one
    ``{"image": (1, C, D, H, W), "label": (1, 1, D, H, W), "spacing": (1, 3)}`` per held-out case.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test: list[dict[str, torch.Tensor]]
    in_channels: int
    num_classes: int
    size: tuple[int, int, int]


def load_sites(
    workdir: Path, *, size: int | Sequence[int], gen_size: int = 48, sites: int = 3,
    cases_per_site: Sequence[int] | int = (6, 4, 8), test_cases: int = 4, task: str = "tissue", seed: int = 0,
    spacing_mm: float = 2.0, label_map: str | None = None, max_test: int | None = None, generator: str = "profile",
) -> SiteTensors:
    """Generate (or reuse) a federation under ``workdir`` and preprocess every case to ``size`` once.

    The generator is ``experiments.sitedata.generate_federation`` (behind ``fedseg make-data``);
    called with the parameters of an existing generation it reuses it. ``label_map``: a preset of
    ``client_agent.data.resolve_label_map`` (``"brats_regions"`` for the BraTS-like task).
    ``max_test``: score on the first that many held-out cases only. ``generator``: ``"profile"``
    (the scanner-profile sites of ``experiments.sitedata``) or ``"synth"`` (the randomized
    whole-brain sites of ``experiments.synth``, ``fedseg make-data --generator synth``; tissue task
    only).
    """
    from client_agent.data import NiftiSegDataset, PreprocessConfig, VolumeCache, discover_cases, resolve_label_map

    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {list(GENERATORS)}, got {generator!r}")
    if generator == "synth" and task != "tissue":
        raise ValueError(f"the synth generator makes tissue cases only, not task {task!r}")
    shape = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if generator == "synth":
        from experiments.synth import generate_synth_federation

        data = generate_synth_federation(Path(workdir), sites=sites, cases_per_site=cases_per_site,
                                         test_cases=test_cases, size=gen_size, spacing_mm=spacing_mm, seed=seed)
    else:
        from experiments.sitedata import generate_federation

        data = generate_federation(Path(workdir), sites=sites, cases_per_site=cases_per_site, test_cases=test_cases,
                                   size=gen_size, seed=seed, task=task, spacing_mm=spacing_mm)
    cache = VolumeCache(config=PreprocessConfig(spatial_size=shape), label_map=resolve_label_map(label_map),
                        num_classes=data.num_classes)
    train = NiftiSegDataset([c for d in data.site_dirs for c in discover_cases(d)], cache=cache)
    test = NiftiSegDataset(discover_cases(data.test_dir)[:max_test], cache=cache)
    items = [train[i] for i in range(len(train))]
    return SiteTensors(
        train_x=torch.stack([torch.as_tensor(it["image"]) for it in items]),
        train_y=torch.stack([torch.as_tensor(it["label"]) for it in items]).long(),
        test=[
            {"image": torch.as_tensor(it["image"])[None], "label": torch.as_tensor(it["label"])[None].long(),
             "spacing": torch.as_tensor(it["spacing"]).reshape(1, 3)}
            for it in (test[i] for i in range(len(test)))
        ],
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        size=shape,  # type: ignore[arg-type]
    )


def eval_points(steps: int) -> list[int]:
    """Steps after which a network is scored: 0, about 1/8, 1/4, 1/2 of ``steps``, and ``steps``."""
    return sorted({0, steps} | {max(1, round(steps * f)) for f in (0.125, 0.25, 0.5)})


def skip_reason(name: str, size: int) -> str | None:
    """Why ``name`` cannot train at ``size``³ with the registry's defaults, or None."""
    try:
        with torch.device("meta"):
            build_model(name, in_channels=1, out_channels=2, img_size=(size,) * 3)
    except ValueError as exc:
        return str(exc)
    except (RuntimeError, NotImplementedError):
        pass  # a constructor that needs real values: it builds, just not on the meta device
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_curve(
    name: str, data: SiteTensors, *, steps: int, batch: int, lr: float, device: torch.device, amp: bool = False,
    seed: int = 0, deadline: float | None = None, points: Sequence[int] | None = None,
    scorer: Callable[[torch.nn.Module, SiteTensors], float] | None = None, options: dict[str, Any] | None = None,
    on_point: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Train ``name`` for ``steps`` Adam steps on ``data``; score it at ``points`` (default
    :func:`eval_points`) with ``client_agent.training.evaluate`` (Dice and HD95), or with ``scorer``
    (Dice only) when given. ``options``: ``build_model`` options (default: the registry's).

    Batches are drawn from one seeded permutation per epoch, the same for every network. With
    ``deadline`` (a ``time.monotonic()`` value) training stops early once it passes, scores the
    network where it stands and records ``"stopped_early": True``. ``on_point`` is called with
    the curve so far after each scoring point.
    """
    from client_agent.training import evaluate, seed_everything

    seed_everything(seed)
    net = build_model(name, in_channels=data.in_channels, out_channels=data.num_classes,
                      img_size=data.size, **(options or {})).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DiceCELoss(lambda_dice=0.5)
    order = torch.Generator().manual_seed(seed)
    n = data.train_x.shape[0]
    perm: list[int] = []
    points = set(eval_points(steps) if points is None else points)
    curve: list[dict[str, Any]] = []
    train_s = 0.0
    cpu_s = 0.0  # this process's CPU time in the steps: on a shared machine, wall time depends on the load
    losses: list[float] = []
    stopped_early = False

    def score(step: int) -> dict[str, Any]:
        if scorer is not None:
            dice = scorer(net, data)
            net.train()
            return {"step": step, "train_s": round(train_s, 3), "cpu_s": round(cpu_s, 3), "dice": dice,
                    "hd95": float("nan")}
        scores = evaluate(net, data.test, device=device, num_classes=data.num_classes, amp=amp)
        net.train()
        return {"step": step, "train_s": round(train_s, 3), "cpu_s": round(cpu_s, 3), "dice": float(scores["dice"]),
                "hd95": float(scores["hd95"])}

    if 0 in points:
        curve.append(score(0))
    step = 0
    for step in range(1, steps + 1):
        idx = []
        while len(idx) < batch:
            if not perm:
                perm = torch.randperm(n, generator=order).tolist()
            idx.append(perm.pop())
        x = data.train_x[idx].to(device, non_blocking=True)
        y = data.train_y[idx].to(device, non_blocking=True)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))  # waits for the device
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        if deadline is not None and time.monotonic() > deadline and step < steps:
            stopped_early = True
            break
        if step in points:
            curve.append(score(step))
            if on_point is not None:
                on_point(curve)
    if not curve or curve[-1]["step"] != step:
        curve.append(score(step))
    params = sum(p.numel() for p in net.parameters())
    del net, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    last = curve[-1]
    return {
        "params": params,
        "steps": step,
        "train_s": round(train_s, 3),
        "step_s": round(train_s / max(step, 1), 4),
        "cpu_s": round(cpu_s, 3),
        "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
        "dice": last["dice"],
        "hd95": last["hd95"],
        "curve": curve,
        "stopped_early": stopped_early,
    }


def dice_at_time(curve: Sequence[dict[str, Any]], seconds: float, key: str = "train_s") -> dict[str, Any]:
    """The last scoring point of ``curve`` whose training time ``key`` (``train_s`` wall, ``cpu_s``
    CPU) is within ``seconds``."""
    within = [p for p in curve if p[key] <= seconds * 1.0001]
    return dict(within[-1]) if within else {"step": 0, "train_s": 0.0, "cpu_s": 0.0, "dice": None}


def summarize(results: dict[str, dict[str, Any]], ours: str = OURS) -> dict[str, Any]:
    """Dice at equal steps, and at equal wall time (our default's training time), per network."""
    trained = {k: v for k, v in results.items() if "curve" in v}
    out: dict[str, Any] = {
        "dice_at_equal_steps": {k: v["dice"] for k, v in trained.items()},
        "steps_done": {k: v["steps"] for k, v in trained.items()},
    }
    if ours in trained:
        wall = trained[ours]["train_s"]
        at = {k: dice_at_time(v["curve"], wall) for k, v in trained.items()}
        out["wall_time_s"] = wall
        out["dice_at_equal_wall_time"] = {k: p["dice"] for k, p in at.items()}
        out["steps_at_equal_wall_time"] = {k: p["step"] for k, p in at.items()}
        # On a shared CPU the wall time of a step depends on the load while it ran; the process's
        # CPU time does not, so equal CPU time is the fairer "equal time" there.
        if "cpu_s" in trained[ours] and all("cpu_s" in p for v in trained.values() for p in v["curve"]):
            cpu = trained[ours]["cpu_s"]
            at_cpu = {k: dice_at_time(v["curve"], cpu, key="cpu_s") for k, v in trained.items()}
            out["cpu_time_s"] = cpu
            out["dice_at_equal_cpu_time"] = {k: p["dice"] for k, p in at_cpu.items()}
            out["steps_at_equal_cpu_time"] = {k: p["step"] for k, p in at_cpu.items()}
        for other in trained:
            if other != ours:
                out.setdefault("dice_minus", {})[other] = trained[ours]["dice"] - trained[other]["dice"]
    return out


def machine() -> dict[str, Any]:
    """Cores, CPU model, torch, threads, date and the 1-minute load average now."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import cpu_model, load_average

    return {"cores": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "load_average": load_average()}


def table(summary: dict[str, Any]) -> str:
    """The Markdown table of a run."""
    lines = ["| model | params M | steps | s / step | CPU s / step | Dice @ equal steps | HD95 mm | "
             "Dice @ equal wall time (steps) | Dice @ equal CPU time (steps) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in summary["models"].items():
        if "curve" not in r:  # skipped or failed
            lines.append(f"| {name} | | | | | skipped: {r.get('skipped', r.get('error'))} | | | |")
            continue
        wall = summary.get("dice_at_equal_wall_time", {}).get(name)
        wall_steps = summary.get("steps_at_equal_wall_time", {}).get(name)
        at_cpu = summary.get("dice_at_equal_cpu_time", {}).get(name)
        cpu = r.get("cpu_s")
        cpu_step = "" if cpu is None else f"{cpu / max(r['steps'], 1):.2f}"
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['steps']} | {r['step_s']:.2f} | {cpu_step} | {r['dice']:.3f} | "
                     f"{r['hd95']:.1f} | {'n/a' if wall is None else f'{wall:.3f}'} ({wall_steps}) | "
                     f"{'n/a' if at_cpu is None else f'{at_cpu:.3f}'} ({summary.get('steps_at_equal_cpu_time', {}).get(name)}) |")
    return "\n".join(lines)


def run(args: argparse.Namespace, out: Path | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Train and score every network of ``args.models``. With ``out``, the JSON so far is written
    there after each network (``pending`` lists those still to come); with ``resume``, networks
    already in ``out`` from a run of the same setup are kept instead of trained again."""
    from client_agent.training import pick_device

    device = pick_device(args.device)
    started = time.monotonic()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dice-equal-steps-"))
    data = load_sites(workdir / "data", size=args.size, gen_size=args.gen_size, seed=args.seed,
                      generator=args.generator, spacing_mm=args.spacing_mm)
    prep_s = time.monotonic() - started
    setup = run_setup(args)
    deadline = None if args.time_limit_s is None else started + args.time_limit_s
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = previous_results(out, setup, device_name) if resume and out is not None else {}

    def summary_now(pending: Sequence[str]) -> dict[str, Any]:
        return {
            "benchmark": "dice_equal_steps", "device": device_name, **setup,
            "amp": "bf16" if args.amp and device.type == "cuda" else "fp32",
            "train_cases": int(data.train_x.shape[0]), "test_cases": len(data.test),
            "data_s": round(prep_s, 1), "total_s": round(time.monotonic() - started, 1),
            "machine": machine(), "models": dict(results), "pending": list(pending), **summarize(results),
        }

    for i, name in enumerate(args.models):
        if name in results:
            print(f"{name}: kept from {out} (same setup)", file=sys.stderr, flush=True)
            continue
        reason = skip_reason(name, args.size)
        if reason:
            results[name] = {"skipped": reason}
            continue
        print(f"training {name} for {args.steps} steps …", file=sys.stderr, flush=True)

        def progress(curve: list[dict[str, Any]], name: str = name, i: int = i) -> None:
            if out is not None:  # the curve so far, so that a kill keeps it
                write_json(out, {**summary_now(args.models[i:]), "in_progress": {name: curve}})

        results[name] = train_curve(name, data, steps=args.steps, batch=args.batch, lr=args.lr, device=device,
                                    amp=args.amp, seed=args.seed, options=args.ours_options if name == OURS else None,
                                    deadline=deadline, on_point=progress)
        print(f"  {name}: Dice {results[name]['dice']:.3f} after {results[name]['train_s']:.0f} s", file=sys.stderr)
        if out is not None:  # each network's result is kept as soon as it is there
            write_json(out, summary_now(args.models[i + 1:]))
    return summary_now([])


def run_setup(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs comparable: the data, the training and our network's options."""
    return {"generator": args.generator, "spacing_mm": args.spacing_mm, "ours_options": args.ours_options,
            "size": args.size, "gen_size": args.gen_size, "batch": args.batch, "steps": args.steps, "lr": args.lr,
            "seed": args.seed}


def previous_results(out: Path, setup: dict[str, Any], device: str) -> dict[str, dict[str, Any]]:
    """The networks already trained in ``out`` by a run of the same setup on the same device (``--resume``)."""
    if not out.is_file():
        return {}
    try:
        old = json.loads(out.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{out} is not valid JSON ({exc}); move it away or run without --resume") from exc
    if old.get("device") != device or any(old.get(k) != v for k, v in setup.items()):
        differ = sorted(k for k, v in setup.items() if old.get(k) != v) or ["device"]
        raise ValueError(f"{out} holds a run with another setup (differs in {differ}); "
                         f"run without --resume or with another --out")
    return {k: v for k, v in old.get("models", {}).items() if "curve" in v}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` through a temporary file and a rename, so a kill leaves the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, default=48, help="training grid, voxels per side (default 48)")
    parser.add_argument("--generator", choices=GENERATORS, default="synth",
                        help="site data: synth (default; randomized whole-brain cases, experiments/synth.py) or "
                             "profile (scanner-profile copies of one brain, experiments/sitedata.py)")
    parser.add_argument("--gen-size", type=int, help="size the site data is generated at (default 64 synth, 48 profile)")
    parser.add_argument("--spacing-mm", type=float,
                        help="voxel size the site data is generated at (default 3.0 synth, 2.0 profile; "
                             "gen-size x spacing is the field of view)")
    parser.add_argument("--steps", type=int, default=40, help="Adam steps per network (default 40)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-options", type=json.loads, default=None, metavar="JSON",
                        help='build_model options for transformer_unet, e.g. \'{"channels": [8, 16, 32, 64, 128]}\' (the first lean default)')
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workdir", help="where the site data is generated (default: a temporary folder)")
    parser.add_argument("--out", help="JSON file to write (default benchmarks/results/dice-equal-steps-<size>.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--time-limit-s", type=float,
                        help="stop training when the run has taken this long; the network in training is scored "
                             "where it stands and marked stopped_early")
    parser.add_argument("--resume", action="store_true",
                        help="keep the networks already in --out from a run of the same setup; train the rest")
    args = parser.parse_args(argv)
    if args.gen_size is None:
        args.gen_size = 64 if args.generator == "synth" else 48
    if args.spacing_mm is None:
        args.spacing_mm = 3.0 if args.generator == "synth" else 2.0
    for name in ("size", "gen_size", "steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / f"dice-equal-steps-{args.size}.json"
    summary = run(args, out, resume=args.resume)
    write_json(out, summary)
    m = summary["machine"]
    print(f"# Dice at equal steps: {args.steps} Adam steps (lr {args.lr:g}, batch {args.batch}) on "
          f"{summary['train_cases']} pooled site cases at {args.size}³, scored on {summary['test_cases']} held-out cases")
    print(f"# {m['cores']} cores ({m['cpu']}), device {summary['device']}, torch {m['torch']}, threads {m['threads']}, "
          f"{m['date']}, load {m['load_average']:.1f}; equal wall time = ours' {summary.get('wall_time_s', 0):.0f} s")
    print(table(summary))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
