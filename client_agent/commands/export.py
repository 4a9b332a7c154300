"""Export a model as TorchScript, ONNX (checked under onnxruntime) or a MONAI bundle that MONAI's runner executes."""

from __future__ import annotations

import argparse
from pathlib import Path

# At import time, so that a missing torch is reported as the extra to install (fedseg.cli).
from client_agent.export import EXPORT_FORMATS, export_model
from client_agent.inference import load_model


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="checkpoint from fedseg train, or a federation's .frames model")
    parser.add_argument("--config", type=Path, help="federation (or fedseg simulate) TOML: required for a .frames model")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="new (or empty) folder to write")
    parser.add_argument("--channel-names", type=_comma_list, metavar="A,B", help="input channel names (bundle metadata)")
    parser.add_argument("--class-names", type=_comma_list, metavar="A,B",
                        help="class names incl. background (bundle metadata)")


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, config_path=args.config, device="cpu")
    result = export_model(loaded, args.format, args.out, channel_names=args.channel_names, class_names=args.class_names)
    for path in result.files:
        print(f"wrote {path}")
    print(f"largest logit difference from the torch model on a check input: {result.max_abs_diff:.2e}")
    if args.format == "bundle":
        print(f"run it: python -m monai.bundle run --config_file {result.out_dir}/configs/inference.json "
              f"--bundle_root {result.out_dir} --image SCAN.nii.gz --output_dir OUT")
    return 0
