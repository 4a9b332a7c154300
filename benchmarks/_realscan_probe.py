"""What the real-scan training probes share (``augment_recipes.py``, ``patch_training.py``).

Both train the quick generalization experiment's network in a plain loop (not the federation) on
a fixed pool of randomized cases and score it on the installed real scan. Here: the options they
share, the network as ``experiments/configs/generalization.toml`` pins it, the case pool (the
experiment's three site ranges of ``experiments.synth``, cycled, each case z-scored inside the
brain as sites do) and Colin 27 with its classical reference (``experiments.realscan``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUICK_CONFIG = Path(__file__).resolve().parents[1] / "experiments/configs/generalization.toml"


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pool``, ``--lr``, ``--batch``, ``--seed``: the case pool and the Adam loop."""
    parser.add_argument("--pool", type=int, default=72, help="fixed randomized cases to draw from")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)


def build_quick_network(grid: tuple[int, int, int], seed: int) -> Any:
    """The quick generalization experiment's network (as its configuration pins it) for ``grid``
    inputs, initialised from ``seed``: every arm of a probe starts from the same weights."""
    import torch

    from experiments.simulate import load_simulation_config
    from model import build_model

    spec = load_simulation_config(QUICK_CONFIG)[1].model
    torch.manual_seed(seed)
    return build_model(spec.architecture, in_channels=spec.in_channels, out_channels=spec.out_channels,
                       img_size=grid, **dict(spec.options))


def randomized_pool(count: int, *, size: int, spacing_mm: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` randomized cases: (z-scored image (1, D, H, W) float32, labels (D, H, W)), the sites' ranges cycled."""
    from client_agent.data.preprocess import normalize_image
    from experiments import sitedata, synth

    templates = synth.load_synth_templates(2.0)
    ranges = [r for _, r in synth.SYNTH_SITES]
    pool = []
    for i in range(count):
        anatomy, scanner = sitedata._case_rngs(seed, 7, i)
        image, label, _ = synth.make_synth_case(templates, size=size, spacing_mm=spacing_mm,
                                                ranges=ranges[i % len(ranges)], anatomy_rng=anatomy, scanner_rng=scanner)
        pool.append((normalize_image(image[None], "nonzero"), label))
    return pool


@dataclass(frozen=True)
class ProbeScan:
    """The first installed real scan at its native grid, with the project's classical reference."""

    image: np.ndarray
    affine: np.ndarray
    reference: np.ndarray


def real_scan() -> ProbeScan:
    from client_agent.spacing import load_scan
    from experiments import realscan

    scans = realscan.available_real_scans()
    if not scans:
        raise SystemExit(realscan.missing_scan_hint())
    image, affine = load_scan(scans[0].path)
    return ProbeScan(image=image, affine=affine, reference=realscan.reference_segmentation(image))
