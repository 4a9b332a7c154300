"""Training-step time on a CPU: the channels-last layout the sites train in, against the default layout.

``client_agent.training.conv_layout`` puts the model and every batch in PyTorch's
``channels_last_3d`` layout during a CPU training epoch. This benchmark times the same training
step (forward, Dice+CE loss, backward, Adam) both ways, from the same weights and on the same
batch, and prints the ratio: the baseline is the default ``(N, C, D, H, W)`` layout. The model is
the quick generalization experiment's (``experiments/configs/generalization.toml``: Transformer
U-Net 8-16-32-64 at 48³), 4 output classes, random input.

``--processes K`` runs K copies side by side, each with ``--threads`` torch threads, as the K
site agents of a simulated federation share the machine's cores; every copy prints its own line.

Usage::

    python benchmarks/conv_layout.py --batch 1 2 --steps 6 --json
    python benchmarks/conv_layout.py --processes 3 --threads 1 --batch 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "generalization.toml"


def _time_steps(batch: int, steps: int, channels_last: bool, threads: int) -> float:
    """Median seconds of one training step after a warm-up step."""
    import torch

    from client_agent.training import conv_layout
    from experiments.simulate import load_simulation_config
    from model import DiceCELoss, build_model

    torch.set_num_threads(threads)
    m = load_simulation_config(CONFIG)[1].model
    size = tuple(m.img_size)
    torch.manual_seed(0)
    net = build_model(m.architecture, in_channels=m.in_channels, out_channels=m.out_channels, img_size=size,
                      **dict(m.options))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(lambda_dice=0.5)
    image = torch.randn(batch, m.in_channels, *size)
    label = torch.randint(0, m.out_channels, (batch, 1, *size))
    times = []
    with conv_layout(net, torch.device("cpu")) if channels_last else contextlib.nullcontext() as layout:
        x = image.contiguous(memory_format=layout) if layout is not None else image
        for _ in range(steps + 1):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), label).backward()
            opt.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _measure(args: argparse.Namespace, index: int) -> dict[str, Any]:
    rows = {}
    for batch in args.batch:
        default = _time_steps(batch, args.steps, False, args.threads)
        channels_last = _time_steps(batch, args.steps, True, args.threads)
        rows[str(batch)] = {"default_s": round(default, 3), "channels_last_s": round(channels_last, 3),
                            "speedup_vs_default": round(default / channels_last, 2)}
    return {"process": index, "threads": args.threads, "processes": args.processes, "batches": rows,
            "load_1min": round(os.getloadavg()[0], 2)}


def _worker(args: argparse.Namespace, index: int, queue: Any) -> None:
    queue.put(_measure(args, index))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per layout (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--processes", type=int, default=1, help="copies side by side (sites sharing the cores)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.threads < 1 or args.steps < 1 or min(args.batch) < 1:
        parser.error("--processes, --threads, --steps and --batch must be >= 1")

    if args.processes == 1:
        results = [_measure(args, 0)]
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(args, i, queue)) for i in range(args.processes)]
        for p in procs:
            p.start()
        results = sorted((queue.get() for _ in procs), key=lambda r: r["process"])
        for p in procs:
            p.join()
    print(f"{'process':>7} {'batch':>5} {'default s':>10} {'channels-last s':>16} {'speedup':>8}")
    for r in results:
        for batch, row in r["batches"].items():
            print(f"{r['process']:>7} {batch:>5} {row['default_s']:>10.3f} {row['channels_last_s']:>16.3f} "
                  f"{row['speedup_vs_default']:>7.2f}x")
    if args.json:
        print(json.dumps({"config": str(CONFIG.relative_to(CONFIG.parents[2])), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
