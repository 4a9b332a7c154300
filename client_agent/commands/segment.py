"""Segment one scan; the uint8 class map keeps the scan's own grid and affine."""

from __future__ import annotations

import argparse
from pathlib import Path

from client_agent.commands.options import add_model_arguments, size_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from client_agent.inference import SEGMENT_MODES

    add_model_arguments(parser)
    parser.add_argument("--input", type=Path, action="append", required=True, metavar="IMG",
                        help="the scan (.nii/.nii.gz); repeat once per modality, in training order")
    parser.add_argument("--output", type=Path, required=True, metavar="MASK", help="uint8 class map to write (.nii.gz)")
    parser.add_argument("--mode", choices=SEGMENT_MODES, default="resize",
                        help="resize: whole scan to the training grid and back (default, as trained); "
                             "native: windows at the scan's resolution")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default 0.25)")


def run(args: argparse.Namespace) -> int:
    from client_agent.inference import load_model, segment_file

    loaded = load_model(args.model, config_path=args.config, device=args.device)
    roi = size_arg("--roi", args.roi) if args.roi else None
    result = segment_file(loaded, args.input, args.output, mode=args.mode, roi=roi, overlap=args.overlap, amp=args.amp)
    counts = ", ".join(f"{c}: {n}" for c, n in result.class_voxels.items())
    print(f"wrote {result.output}: {result.shape[0]}x{result.shape[1]}x{result.shape[2]} uint8, "
          f"voxels per class {{{counts}}} ({result.seconds:.1f}s)")
    return 0
