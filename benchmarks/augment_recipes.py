"""Augmentation recipes on a real scan: Dice on Colin 27 after N steps, each recipe against ``standard``.

A plain training loop (not the federation) on a fixed pool of randomized cases from
``experiments.synth`` (the quick generalization experiment's three site ranges, cycled; 48³ at
4 mm by default), each draw augmented by a recipe of ``client_agent.data.augment`` (``standard``,
``synthseg``, ``contrast`` or ``none``; a ``+lr`` suffix keeps the recipe but flips left-right only). The quick
experiment's Transformer U-Net, Adam, Dice+CE, batch 2, one torch thread. Every recipe of one run
trains from the same initial weights on the same pool in the same draw order. Every ``--every``
steps the model segments the installed real scan (Colin 27, Debian's ``mricron-data``) at its
native 1 mm grid and is scored against the classical reference (``experiments.realscan``); one
JSON line per scoring point, then one line per recipe with its last scores and their difference
from the baseline, the first recipe of ``--recipes`` (``standard`` by default).

Usage (about 1.5 CPU-s a step and recipe)::

    nice -n 10 python benchmarks/augment_recipes.py --recipes standard,standard+lr,synthseg --steps 200 --every 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch
from _realscan_probe import add_probe_arguments, build_quick_network, randomized_pool, real_scan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="standard,standard+lr,synthseg",
                        help="comma-separated recipes, the first the baseline; NAME+lr: left-right flips only")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=40, help="score the real scan every this many steps")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--spacing", type=float, default=4.0)
    add_probe_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from client_agent.data.augment import augmentation_recipe, build_augmentation
    from experiments import realscan
    from model.losses import DiceCELoss

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    configs = {}
    for recipe in recipes:
        name, _, flips = recipe.partition("+")
        if flips not in ("", "lr"):
            parser.error(f"recipe {recipe!r}: the only suffix is +lr")
        config = augmentation_recipe(name)
        configs[recipe] = dataclasses.replace(config, flip_axes=(0,)) if config is not None and flips else config

    scan = real_scan()
    image, affine, reference = scan.image, scan.affine, scan.reference
    grid = (args.size,) * 3
    pool = randomized_pool(args.pool, size=args.size, spacing_mm=args.spacing, seed=args.seed)
    last: dict[str, dict[str, float]] = {}
    for recipe, config in configs.items():
        augment = build_augmentation(config, spatial_size=grid, seed=0) if config else None
        net = build_quick_network(grid, args.seed)
        optimizer = torch.optim.Adam(net.parameters(), args.lr)
        loss_fn = DiceCELoss(lambda_dice=0.5)

        def item(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = pool[i]
            if augment is None:
                return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))[None]
            out: dict[str, Any] = augment({"image": torch.from_numpy(x.copy()),
                                           "label": torch.from_numpy(y.astype(np.float32))[None]})
            im, lb = out["image"], out["label"]
            im = im.as_tensor() if hasattr(im, "as_tensor") else im
            lb = lb.as_tensor() if hasattr(lb, "as_tensor") else lb
            return im.float(), lb.round().long()

        rng = np.random.default_rng(0)
        started, losses = time.time(), []
        for step in range(1, args.steps + 1):
            batch = [item(int(rng.integers(len(pool)))) for _ in range(args.batch)]
            loss = loss_fn(net(torch.stack([b[0] for b in batch])), torch.stack([b[1] for b in batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % args.every == 0 or step == args.steps:
                scores = realscan.score_segmentation(
                    realscan.segment_scan(net, image, affine, spacing_mm=args.spacing, size=grid), reference)
                net.train()
                last[recipe] = {k: round(v, 3) for k, v in scores.items()}
                print(json.dumps({"recipe": recipe, "step": step, "t": round(time.time() - started),
                                  "loss": round(float(np.mean(losses[-args.every:])), 3), **last[recipe]}), flush=True)
    baseline = recipes[0]
    for recipe in recipes:
        print(json.dumps({"recipe": recipe, "baseline": baseline, "steps": args.steps, **last[recipe],
                          **{f"{k}_vs_baseline": round(v - last[baseline][k], 3) for k, v in last[recipe].items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
