"""Helpers shared by several test files (plain functions; the shared fixtures are in conftest.py).

* :func:`wait_for`: poll a condition with a deadline, failing with what was awaited.
* :func:`examples`: a property test's example count, scaled by the hypothesis profile.
* :func:`federation_toml`: the federation TOML of a tiny federation whose model trains on a CPU
  in seconds (a 2- or 3-level Transformer U-Net with one transformer layer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hypothesis import settings


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0, poll_s: float = 0.02) -> None:
    """Return once ``condition()`` holds; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def examples(n: int) -> int:
    """``n`` scaled by the active hypothesis profile's count over the default profile's (100).

    An explicit ``settings(max_examples=...)`` overrides every profile, so a test that wants its own count
    writes ``settings(max_examples=examples(n))``: ``n`` in ``make test``, n/10 (at least 1) under
    ``--hypothesis-profile=fast`` (tests/conftest.py).
    """
    scale = settings.default.max_examples / settings.get_profile("default").max_examples
    return max(1, round(n * scale))


def federation_toml(
    *,
    federation_id: str = "tiny",
    sites: Sequence[str] = ("site-1",),
    out_channels: int = 4,
    img_size: int = 16,
    channels: Sequence[int] = (8, 16, 32),
    training: Mapping[str, Any] | None = None,
) -> str:
    """A one-round federation of ``sites`` (each one needed), with a tiny ``transformer_unet``.

    ``training`` is the ``[training]`` table (default: only ``seed = 3``).
    """
    tables: dict[str, Mapping[str, Any]] = {
        "federation": {"id": federation_id, "rounds": 1, "min_clients": len(sites), "max_clients": len(sites),
                       "sites": list(sites)},
        "training": training if training is not None else {"seed": 3},
        "model": {"architecture": "transformer_unet", "in_channels": 1, "out_channels": out_channels,
                  "img_size": [img_size] * 3},
        "model.options": {"channels": list(channels), "num_transformer_layers": 1, "num_heads": 2},
    }
    return "\n".join(f"[{name}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in table.items())
                     for name, table in tables.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r} in a test federation")
