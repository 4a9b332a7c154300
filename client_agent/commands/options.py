"""Argument types shared by ``fedseg train``, ``evaluate`` and ``segment``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client_agent.inference import size3


def yes_no(value: str) -> bool:
    v = value.strip().lower()
    if v in ("yes", "y", "true", "1", "on"):
        return True
    if v in ("no", "n", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def json_object(value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {value!r}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"channels\": [8, 16, 32]}}', got {value!r}")
    return data


def size_arg(name: str, values: Sequence[int]) -> tuple[int, int, int]:
    if len(values) not in (1, 3):
        raise ValueError(f"{name} takes one int or three (D H W), got {list(values)}")
    return size3(name, values[0] if len(values) == 1 else list(values))


def label_map_arg(value: str) -> str | dict[str, Any]:
    """A preset name, or a JSON object ``{"4": 3}``."""
    return json_object(value) if value.strip().startswith("{") else value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="checkpoint from fedseg train, or a federation's .frames model")
    parser.add_argument("--config", type=Path, help="federation (or fedseg simulate) TOML: required for a .frames model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--roi", type=int, nargs="+", metavar="N",
                        help="sliding-window size: one int or three (default: the window the model trained on, "
                             "[model] patch_size / fedseg train --patch-size, else its img_size)")
    parser.add_argument("--amp", type=yes_no, default=False, metavar="yes/no", help="bf16 autocast on CUDA (default no)")
