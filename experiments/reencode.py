"""Re-encode the last update of each site of a finished run with the codec as it is now.

The bytes a run moved depend only on its updates and on the codec; when the codec's framing
changes (e.g. a more compact frame header) the training, and so every update, stays the same.
A site's state directory keeps its last round's local and global models and the residual that
went into that round's encoding, so the exact update it uploaded can be encoded again:

    Δ_R = local_R − global_R,    frames = encode_update(Δ_R, spec, residual_{R−1})

With an unchanged codec this reproduces the bytes the agent recorded for round R (a check of the
method); with a changed one it measures what that upload costs now. For top-k the cost of a round
hardly varies (k entries per tensor every round), so ``rounds × bytes of round R`` estimates what
the whole run would have moved.

    python -m experiments.reencode runs/experiments/demo/targets-long-30/fedsegnet
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import codec
from aggregator_service.config import read_config_tables
from client_agent.state import split_site_state


@dataclass(frozen=True)
class Reencoded:
    """One site's last round: what it recorded uploading, what the codec makes of it now, and the
    dense fp32 size of the same update (the baseline of the compression ratio)."""

    site: str
    round_id: int
    recorded_bytes: int
    reencoded_bytes: int
    dense_fp32_bytes: int


def last_round_inputs(state_dir: Path) -> tuple[str, int, int, list[tuple[str, np.ndarray]], dict[str, np.ndarray] | None]:
    """What a site's agent encoded in its last submitted round: ``(site, round, recorded bytes,
    deltas, residual)`` with ``deltas = local_R − global_R`` and the residual kept after round
    ``R − 1`` (None in round 1, as the agent had none).

    Raises:
        FileNotFoundError: the site submitted nothing, or its state lacks that round's files.
    """
    agent = json.loads((state_dir / "agent.json").read_text())
    submitted = {int(r): v for r, v in agent.get("submitted", {}).items()}
    if not submitted:
        raise FileNotFoundError(f"{state_dir}: the site submitted nothing")
    last = max(submitted)
    local = codec.load_tensors(state_dir / f"local-{last:04d}.frames")
    global_ = codec.load_tensors(state_dir / f"global-{last:04d}.frames")
    # The residual file also holds the site's other state (velocity, ages, optimizer): only the residual.
    residual = (split_site_state(codec.load_tensors(state_dir / f"residual-{last - 1:04d}.frames"))[0]
                if last > 1 else None)
    deltas = [(name, local[name] - global_[name]) for name in global_]
    return str(agent.get("site", state_dir.name)), last, int(submitted[last]["bytes"]), deltas, residual


def reencode_last_round(state_dir: Path, spec: codec.CodecSpec) -> Reencoded:
    """Encode a site's last submitted update again under ``spec`` (see :func:`last_round_inputs`)."""
    site, round_id, recorded, deltas, residual = last_round_inputs(state_dir)
    encoded = codec.encode_update(deltas, spec, residual)
    size = sum(len(frame) for frame in encoded.frames)
    dense = sum(4 * array.size for _, array in deltas)
    return Reencoded(site, round_id, recorded, size, dense)


def codec_spec_of(workdir: Path) -> codec.CodecSpec:
    """The codec settings a simulation ran with (its ``sim.toml`` or ``federation.toml``)."""
    for name in ("federation.toml", "sim.toml"):
        path = workdir / name
        if path.exists():
            return codec.CodecSpec(**read_config_tables(path).get("codec", {}))
    raise FileNotFoundError(f"{workdir}: neither federation.toml nor sim.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.reencode", description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="a simulation's work folder (holds states/)")
    args = parser.parse_args(argv)
    print("| run | site | round | recorded B | re-encoded B | dense fp32 B | × smaller now |")
    print("|---|---|---|---|---|---|---|")
    for workdir in args.workdirs:
        spec = codec_spec_of(workdir)
        for state_dir in sorted((workdir / "states").iterdir()):
            r = reencode_last_round(state_dir, spec)
            print(f"| {workdir.name} | {r.site} | {r.round_id} | {r.recorded_bytes} | {r.reencoded_bytes} | "
                  f"{r.dense_fp32_bytes} | {r.dense_fp32_bytes / r.reencoded_bytes:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
