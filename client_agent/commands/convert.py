"""Convert DICOM series (one folder per series, or mixed) into NIfTI in the MSD layout a site agent reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from client_agent.dicom import convert_dicom


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dicom", type=Path, required=True, metavar="DIR", help="folder of DICOM series (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="new (or empty) folder to write")
    parser.add_argument("--labels", type=Path, metavar="DIR", help="NIfTI masks named <case>.nii.gz on the converted grids")


def run(args: argparse.Namespace) -> int:
    converted = convert_dicom(args.dicom, args.out, labels_dir=args.labels)
    for c in converted:
        spacing = " x ".join(f"{s:.3g}" for s in c.spacing)
        print(f"{c.case_id}: {c.image} {c.shape} at {spacing} mm ({c.modality or '?'} {c.description!r})"
              + (f", label {c.label}" if c.label else ", no label"))
    unlabelled = sum(c.label is None for c in converted)
    if unlabelled:
        print(f"{unlabelled} series without a label: fedseg segment reads them; a site agent trains only on "
              "labelled cases (pass --labels DIR with <case>.nii.gz masks)")
    return 0
