"""A misbehaving site for the faulty-site scenario: the real ``client-agent``, uploads scaled.

``python -m experiments.faulty_agent --update-scale S <client-agent options>`` runs
:func:`client_agent.cli.main` unchanged in this process, except that every update it encodes is
first multiplied by ``S`` (10: a blown-up update, e.g. a wrong learning rate; -5: sign-flipped
and amplified, as a poisoning site would send). Everything else — data, training, validation,
error feedback, the wire — is the real agent's, so the aggregator sees exactly what such a site
would upload. Simulation only: ``fedseg simulate`` starts it for ``[simulation] fault =
"scaled_update"``; nothing in a deployment imports this module.

Why a wrapper and not an agent option: the agent's command line is a hospital-facing interface,
and a "corrupt my own update" flag does not belong in it. The wrapper hands
:func:`client_agent.cli.main` a ``transform_update`` (:class:`client_agent.agent.SiteAgent`'s hook
on each update after training and before encoding): only this process's agent uploads scaled
updates. The residual is not scaled, so error feedback does not compound the factor from round
to round.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NamedTensors = Mapping[str, Any] | Iterable[tuple[str, Any]]


def scale_deltas(deltas: NamedTensors, factor: float) -> list[tuple[str, np.ndarray]]:
    """``deltas`` with every floating tensor multiplied by ``factor`` (in its own dtype).

    Integer and boolean tensors (e.g. BatchNorm's ``num_batches_tracked``) are passed through:
    scaling a counter is meaningless and the codec sends them losslessly anyway.
    """
    out = []
    for name, array in (deltas.items() if isinstance(deltas, Mapping) else deltas):
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = (array * array.dtype.type(factor)).astype(array.dtype, copy=False)
        out.append((name, array))
    return out


def scaled_update(factor: float) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A ``transform_update`` for the agent that multiplies every floating tensor of an update by ``factor``."""
    if not (math.isfinite(factor) and factor != 0):
        raise ValueError(f"update scale must be a finite non-zero number, got {factor}")

    def scale(deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        log.warning("faulty site: uploading %g x its update", factor)
        return dict(scale_deltas(deltas, factor))

    return scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.faulty_agent", add_help=True,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--update-scale", type=float, required=True, help="factor applied to every update")
    args, agent_argv = parser.parse_known_args(argv)
    from client_agent import cli

    return cli.main(agent_argv, transform_update=scaled_update(args.update_scale))


if __name__ == "__main__":
    sys.exit(main())
