"""Dice, IoU, HD95, precision and recall of a checkpoint or a federation's model on labelled data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from client_agent.commands.options import add_model_arguments, label_map_arg, size_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from client_agent.inference import EVAL_GRIDS

    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, action="append", required=True, metavar="DIR",
                        help="labelled folder (repeatable)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the metrics (per class, mean, per case) here")
    parser.add_argument("--grid", choices=EVAL_GRIDS, default="native",
                        help="native: score the scan-resolution prediction against the stored label (default); "
                             "model: score on the resized training grid, as sites' validation does")
    parser.add_argument("--label-map", type=label_map_arg, metavar="PRESET|JSON",
                        help="map raw label values to classes (default: the checkpoint's)")


def run(args: argparse.Namespace) -> int:
    from client_agent.inference import evaluate_model, format_metrics_table, load_model
    from codec import atomic_write_text

    loaded = load_model(args.model, config_path=args.config, device=args.device, label_map=args.label_map)
    roi = size_arg("--roi", args.roi) if args.roi else None
    result = evaluate_model(loaded, args.data, grid=args.grid, roi=roi, amp=args.amp)
    print(f"{result['cases']} case(s) of {', '.join(result['data'])} on the {result['grid']} grid, model {result['model']}")
    print(format_metrics_table(result))
    if args.json:
        out = Path(args.json)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
