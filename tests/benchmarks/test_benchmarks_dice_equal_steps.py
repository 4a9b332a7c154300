"""dice_equal_steps: equal CPU time, results kept after each network, and --resume."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import dice_equal_steps  # noqa: E402


def _curve(*points: tuple[int, float, float, float]) -> list[dict]:
    return [{"step": s, "train_s": w, "cpu_s": c, "dice": d} for s, w, c, d in points]


def test_equal_cpu_time_takes_the_last_point_within_ours_cpu_seconds() -> None:
    # Ours ran on a loaded machine (wall 50 s for 5 CPU s); UNETR on a quieter one.
    results = {
        "transformer_unet": {"curve": _curve((0, 0, 0, 0.1), (10, 50.0, 5.0, 0.6)), "dice": 0.6, "steps": 10,
                             "train_s": 50.0, "cpu_s": 5.0},
        "unetr": {"curve": _curve((0, 0, 0, 0.1), (5, 6.0, 4.0, 0.3), (10, 12.0, 8.0, 0.5)), "dice": 0.5, "steps": 10,
                  "train_s": 12.0, "cpu_s": 8.0},
    }

    summary = dice_equal_steps.summarize(results)

    assert summary["cpu_time_s"] == 5.0
    assert summary["dice_at_equal_cpu_time"] == {"transformer_unet": 0.6, "unetr": 0.3}
    assert summary["steps_at_equal_cpu_time"] == {"transformer_unet": 10, "unetr": 5}
    # by wall time UNETR finished all its steps within ours' 50 s
    assert summary["dice_at_equal_wall_time"]["unetr"] == 0.5


def test_curves_without_cpu_time_give_no_equal_cpu_time() -> None:
    # results written before the CPU time was recorded still summarize
    results = {"transformer_unet": {"curve": [{"step": 0, "train_s": 0.0, "dice": 0.1}], "dice": 0.1, "steps": 0,
                                    "train_s": 0.0}}

    assert "dice_at_equal_cpu_time" not in dice_equal_steps.summarize(results)


def _args(**overrides: object) -> argparse.Namespace:
    return dice_equal_steps.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()])


def test_resume_keeps_trained_networks_of_the_same_setup_only(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    setup = dice_equal_steps.run_setup(_args(steps=5))
    done = {"curve": _curve((0, 0, 0, 0.1), (5, 1.0, 1.0, 0.4)), "dice": 0.4, "steps": 5}
    dice_equal_steps.write_json(out, {"device": "cpu", **setup,
                                      "models": {"unet": done, "swin_unetr": {"skipped": "48 is not a multiple of 32"}}})

    assert dice_equal_steps.previous_results(out, setup, "cpu") == {"unet": done}  # a skip is decided again
    assert dice_equal_steps.previous_results(tmp_path / "none.json", setup, "cpu") == {}
    with pytest.raises(ValueError, match=r"another setup \(differs in \['steps'\]\)"):
        dice_equal_steps.previous_results(out, dice_equal_steps.run_setup(_args(steps=6)), "cpu")
    with pytest.raises(ValueError, match="differs in \\['device'\\]"):
        dice_equal_steps.previous_results(out, setup, "NVIDIA H200")


def test_write_json_replaces_the_file_whole(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    dice_equal_steps.write_json(out, {"a": 1})
    dice_equal_steps.write_json(out, {"b": 2})

    assert json.loads(out.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_synth_is_the_default_generator_and_sets_its_grid() -> None:
    args = _args()
    assert (args.generator, args.gen_size, args.spacing_mm) == ("synth", 64, 3.0)
    args = _args(generator="profile")
    assert (args.generator, args.gen_size, args.spacing_mm) == ("profile", 48, 2.0)
    with pytest.raises(ValueError, match="tissue cases only"):
        dice_equal_steps.load_sites(Path("unused"), size=32, generator="synth", task="brats")
    with pytest.raises(ValueError, match="generator must be one of"):
        dice_equal_steps.load_sites(Path("unused"), size=32, generator="other")
