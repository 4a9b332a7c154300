"""Training windows against whole volumes at equal CPU time, scored on a real scan.

A plain training loop (not the federation) on a fixed pool of randomized cases from
``experiments.synth`` (the quick generalization experiment's three site ranges, cycled; 48³ at
4 mm), the quick experiment's Transformer U-Net, Adam, Dice+CE, batch 2, one torch thread. The
baseline trains on whole 48³ volumes; each other arm on random ``N``³ windows
(``client_agent.data.RandPatch``, as sites do with ``[model] patch_size``) and predicts by sliding
windows of that size (``model.window_logits``). Every arm starts from the same weights and draws
the same cases in the same order. Each arm trains until ``--cpu-s`` seconds of training CPU; every
``--every`` seconds of it the model segments the installed real scan (Colin 27, Debian's
``mricron-data``) at its native 1 mm grid and is scored against the classical reference
(``experiments.realscan``); scoring time is not counted. One JSON line per scoring point, then one
line per arm: its CPU seconds per step against the baseline's, and its last scores and their
difference from the baseline's at the same CPU time.

Usage (the arms run one after the other on one core; about twice ``--cpu-s`` of wall time per arm
with the scoring)::

    python benchmarks/patch_training.py --arms whole,32 --cpu-s 150 --every 37.5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _realscan_probe import QUICK_CONFIG, add_probe_arguments, build_quick_network, randomized_pool, real_scan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="whole,32", help="comma-separated: 'whole' (the baseline, first) or N (N³ windows)")
    parser.add_argument("--cpu-s", type=float, default=150.0, help="training CPU seconds per arm")
    parser.add_argument("--every", type=float, default=37.5, help="score the real scan every this many CPU seconds")
    add_probe_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from client_agent.data import RandPatch
    from client_agent.spacing import from_model_grid, image_on_grid
    from experiments import realscan
    from experiments.simulate import load_simulation_config
    from model import window_logits
    from model.losses import DiceCELoss

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a != "whole" and not a.isdigit() for a in arms):
        parser.error("--arms: 'whole' or window sizes, e.g. whole,32")
    # The quick generalization experiment's grid, as its configuration pins it.
    sim = load_simulation_config(QUICK_CONFIG)[0]
    size, spacing = sim.size, sim.spacing_mm
    grid = (size,) * 3
    scan = real_scan()
    image, affine, reference = scan.image, scan.affine, scan.reference
    normalized, model_grid = image_on_grid(image, affine, spacing_mm=spacing, size=grid, normalize="nonzero")
    pool = [(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))[None])
            for x, y in randomized_pool(args.pool, size=size, spacing_mm=spacing, seed=args.seed)]
    results: dict[str, dict[str, float]] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    for arm in arms:
        window = None if arm == "whole" else (int(arm),) * 3
        patch = RandPatch(window, seed=args.seed) if window else None
        net = build_quick_network(grid, args.seed)
        optimizer = torch.optim.Adam(net.parameters(), args.lr)
        loss_fn = DiceCELoss(lambda_dice=0.5)
        order = np.random.default_rng(0)
        cpu, steps, losses, next_score = 0.0, 0, [], args.every
        curves[arm] = []
        while cpu < args.cpu_s:
            started = time.process_time()
            batch = [pool[int(order.integers(len(pool)))] for _ in range(args.batch)]
            if patch is not None:
                batch = [patch(x, y) for x, y in batch]
            loss = loss_fn(net(torch.stack([b[0] for b in batch])), torch.stack([b[1] for b in batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cpu += time.process_time() - started
            steps += 1
            losses.append(loss.item())
            if cpu >= next_score or cpu >= args.cpu_s:
                next_score += args.every
                net.eval()
                with torch.no_grad():
                    logits = window_logits(net, torch.from_numpy(normalized)[None], window)
                probs = torch.softmax(logits.float(), dim=1)[0].numpy()
                net.train()
                scores = realscan.score_segmentation(from_model_grid(probs, model_grid, shape=image.shape, affine=affine),
                                                     reference)
                point = {"arm": arm, "steps": steps, "cpu_s": round(cpu, 1), "cpu_s_per_step": round(cpu / steps, 3),
                         "loss": round(float(np.mean(losses[-20:])), 3), **{k: round(v, 3) for k, v in scores.items()}}
                curves[arm].append(point)
                print(json.dumps(point), flush=True)
        results[arm] = curves[arm][-1]
    baseline = arms[0]
    for arm in arms:
        last, base = results[arm], results[baseline]
        print(json.dumps({"arm": arm, "baseline": baseline, "cpu_s": last["cpu_s"], "steps": last["steps"],
                          "step_cpu_vs_baseline": round(last["cpu_s_per_step"] / base["cpu_s_per_step"], 3),
                          **{k: last[k] for k in ("brain", "CSF", "GM", "WM", "GM_WM_mean")},
                          **{f"{k}_vs_baseline": round(last[k] - base[k], 3)
                             for k in ("brain", "CSF", "GM", "WM", "GM_WM_mean")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
