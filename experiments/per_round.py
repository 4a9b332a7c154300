"""``python -m experiments.per_round WORKDIR``: every round's global model of a run, scored on the real scans.

A run's summary scores only its final model on the real scans; whether the models before it were
better, worse or swinging between two states (results/README.md, "Generalization, fifth pass")
shows only when every round's global model is scored the same way. ``fedseg simulate`` keeps them
all in ``WORKDIR/models/global-NNNN.frames`` (``NNNN`` = the round that trains from it: 0002 is the
model after round 1) beside the run's ``federation.toml``; each is scored on every installed real
scan exactly as the experiments score a final model (``experiments/realscan.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from experiments.realscan import RealScan, available_real_scans, evaluate_on_real_scans, load_federation_model, missing_scan_hint

__all__ = ["global_models", "score_rounds", "main"]

_GLOBAL = re.compile(r"global-(\d{4,})\.frames")


def global_models(workdir: Path) -> list[tuple[int, Path]]:
    """``(round it closed, path)`` for every global model of a run, in round order (round 0: the initial model)."""
    models = workdir / "models"
    if not (workdir / "federation.toml").is_file() or not models.is_dir():
        raise FileNotFoundError(f"{workdir} is not a fedseg simulate work folder: it needs federation.toml and models/")
    found = sorted((int(m.group(1)) - 1, path) for path in models.iterdir() if (m := _GLOBAL.fullmatch(path.name)))
    if not found:
        raise FileNotFoundError(f"{models} holds no global-NNNN.frames model")
    return found


def score_rounds(workdir: Path, *, scans: Sequence[RealScan] | None = None) -> list[dict[str, Any]]:
    """One row per global model: ``{"round", "model", "scores": {scan: {brain, CSF, GM, WM, GM_WM_mean}}}``."""
    from aggregator_service.config import load_federation_config

    scans = available_real_scans() if scans is None else list(scans)
    if not scans:
        raise FileNotFoundError(missing_scan_hint())
    models = global_models(workdir)
    config = load_federation_config(workdir / "federation.toml")
    m = config.model
    rows = []
    for closed, path in models:
        net = load_federation_model(path, config).eval()
        scores = evaluate_on_real_scans(net, spacing_mm=m.spacing_mm, size=m.img_size, scans=scans,
                                        roi_size=m.patch_size or None)
        rows.append({"round": closed, "model": str(path), "scores": scores})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.per_round", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path, help="a fedseg simulate --workdir")
    parser.add_argument("--json", type=Path, help="also write the rows here, one JSON object per line")
    args = parser.parse_args(argv)
    try:
        rows = score_rounds(args.workdir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        for scan, s in row["scores"].items():
            print(f"after round {row['round']:3d}  {scan}: brain {s['brain']:.3f}  CSF {s['CSF']:.3f}  "
                  f"GM {s['GM']:.3f}  WM {s['WM']:.3f}  GM/WM {s['GM_WM_mean']:.3f}")
    if args.json:
        args.json.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
