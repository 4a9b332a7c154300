"""The volume cache writes its ``.npz`` entries through the one atomic writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client_agent.data.cache import _read_npz, _write_npz
from client_agent.data.preprocess import Volume


class Unconvertible:
    """An array-like that fails when numpy converts it: the write stops after the image went out."""

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        raise RuntimeError("disk full")


def volume(value: float) -> Volume:
    return Volume(image=np.full((1, 4, 4, 4), value, np.float32), label=np.ones((4, 4, 4), np.uint8),
                  spacing=(1.0, 1.0, 1.5))


def test_an_interrupted_cache_write_keeps_the_previous_entry(tmp_path: Path) -> None:
    path = tmp_path / "case-0123456789abcdef.npz"
    _write_npz(path, volume(2.0))
    broken = Volume(image=np.zeros((1, 4, 4, 4), np.float32), label=Unconvertible(),  # type: ignore[arg-type]
                    spacing=(1.0, 1.0, 1.0))

    with pytest.raises(RuntimeError, match="disk full"):
        _write_npz(path, broken)

    kept = _read_npz(path)
    assert kept is not None
    np.testing.assert_array_equal(kept.image, volume(2.0).image)
    assert kept.spacing == (1.0, 1.0, 1.5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
