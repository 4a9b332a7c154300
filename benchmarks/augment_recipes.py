"""Augmentation recipes on a real scan: Dice on Colin 27 after N steps, one recipe against another.

A plain training loop (not the federation) on a fixed pool of randomized cases from
``experiments.synth`` (the quick generalization experiment's three site ranges, cycled; 48³ at
4 mm by default), each draw augmented by one recipe of ``client_agent.data.augment``
(``standard``, ``synthseg`` or ``none``; ``--flip-lr`` keeps the recipe but flips left-right
only). The quick experiment's Transformer U-Net, Adam, Dice+CE, batch 2, one torch thread.
Every ``--every`` steps the model segments the installed real scan (Colin 27, Debian's
``mricron-data``) at its native 1 mm grid and is scored against the classical reference
(``experiments.realscan``); one JSON line per scoring point. The baseline is the ``standard``
recipe run with the same ``--seed`` (same pool, same draw order).

Usage (about 1.5 CPU-s a step; run the recipes side by side)::

    nice -n 10 python benchmarks/augment_recipes.py --aug standard --steps 200 --every 50
    nice -n 10 python benchmarks/augment_recipes.py --aug standard --flip-lr --steps 200 --every 50
    nice -n 10 python benchmarks/augment_recipes.py --aug synthseg --steps 200 --every 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aug", default="standard", help="recipe: standard, synthseg or none")
    parser.add_argument("--flip-lr", action="store_true", help="the recipe with left-right flips only")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=40, help="score the real scan every this many steps")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--pool", type=int, default=72, help="fixed randomized cases to draw from")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from client_agent.data.augment import augmentation_recipe, build_augmentation
    from client_agent.data.preprocess import normalize_image
    from client_agent.spacing import load_scan
    from experiments import realscan, sitedata, synth
    from model import build_model
    from model.losses import DiceCELoss

    templates = synth.load_synth_templates(2.0)
    scan = realscan.DEFAULT_SCANS[0]
    image, affine = load_scan(scan.path)
    reference = realscan.reference_segmentation(image)
    ranges = [r for _, r in synth.SYNTH_SITES]
    grid = (args.size,) * 3

    def draw(i: int) -> tuple[np.ndarray, np.ndarray]:
        anatomy, scanner = sitedata._case_rngs(args.seed, 7, i)
        img, lab, _ = synth.make_synth_case(templates, size=args.size, spacing_mm=args.spacing,
                                            ranges=ranges[i % len(ranges)], anatomy_rng=anatomy, scanner_rng=scanner)
        return normalize_image(img[None], "nonzero"), lab

    pool = [draw(i) for i in range(args.pool)]
    config = augmentation_recipe(args.aug)
    if config is not None and args.flip_lr:
        config = dataclasses.replace(config, flip_axes=(0,))
    augment = build_augmentation(config, spatial_size=grid, seed=0) if config else None
    net = build_model("transformer_unet", in_channels=1, out_channels=4, img_size=grid, channels=[8, 16, 32, 64],
                      num_transformer_layers=1, num_heads=4)
    optimizer = torch.optim.Adam(net.parameters(), args.lr)
    loss_fn = DiceCELoss(lambda_dice=0.5)

    def item(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = pool[i]
        if augment is None:
            return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))[None]
        out: dict[str, Any] = augment({"image": torch.from_numpy(x.copy()), "label": torch.from_numpy(y.astype(np.float32))[None]})
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
            print(json.dumps({"recipe": args.aug, "flip_lr": args.flip_lr, "step": step, "t": round(time.time() - started),
                              "loss": round(float(np.mean(losses[-args.every:])), 3),
                              **{k: round(v, 3) for k, v in scores.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
