"""Preprocessed volumes cached in memory or as ``.npz`` files, keyed by the files and the preprocessing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client_agent.data.discover import Case
from client_agent.data.errors import DataError
from client_agent.data.preprocess import PreprocessConfig, Volume, preprocess_case
from codec import atomic_writer

logger = logging.getLogger(__name__)


_CACHE_VERSION = 1


@dataclass
class CacheStats:
    """What the cache did: volumes preprocessed from NIfTI, served from disk, served from memory."""

    computed: int = 0
    disk_hits: int = 0
    memory_hits: int = 0


class VolumeCache:
    """Preprocessed volumes keyed by the files (path, mtime, size) and the preprocessing.

    With ``cache_dir`` each volume is an ``.npz`` there (written atomically, read with
    ``allow_pickle=False``), reused across epochs, rounds and restarts; a stale entry of the same
    case is deleted when a new one is written. Without it the volumes stay in this process's
    memory — fine for small sites with ``num_workers=0`` or persistent workers.
    """

    def __init__(
        self,
        *,
        config: PreprocessConfig,
        label_map: Mapping[int, int] | None,
        num_classes: int,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config
        self.label_map = dict(label_map) if label_map else None
        self.num_classes = num_classes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, Volume] = {}
        self.stats = CacheStats()

    def key(self, case: Case) -> str:
        files = []
        for p in (*case.image_paths, case.label_path):
            st = Path(p).stat()
            files.append([str(Path(p).resolve()), st.st_mtime_ns, st.st_size])
        payload = {
            "version": _CACHE_VERSION,
            "files": files,
            "spatial_size": list(self.config.spatial_size),
            "normalize": self.config.normalize,
            "canonical": self.config.canonical,
            "label_map": sorted(self.label_map.items()) if self.label_map else None,
        }
        if self.config.spacing_mm:  # only when set, so caches of resized volumes keep their keys
            payload["spacing_mm"] = self.config.spacing_mm
            # Images are low-pass filtered before a resampling to a coarser spacing (spacing.anti_alias).
            payload["anti_alias"] = 1
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def path_for(self, case: Case, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{_safe_name(case.case_id)}-{key}.npz"

    def get(self, case: Case) -> Volume:
        try:
            key = self.key(case)
        except OSError as exc:
            raise DataError(f"case {case.case_id}: cannot stat its files ({exc})") from exc
        if key in self._memory:
            self.stats.memory_hits += 1
            return self._memory[key]
        if self.cache_dir is not None:
            path = self.path_for(case, key)
            volume = _read_npz(path)
            if volume is not None:
                self.stats.disk_hits += 1
                return volume
        volume = preprocess_case(case, config=self.config, label_map=self.label_map, num_classes=self.num_classes)
        self.stats.computed += 1
        if self.cache_dir is not None:
            _write_npz(self.path_for(case, key), volume)
            self._prune(case, keep=key)
        else:
            self._memory[key] = volume
        return volume

    def _prune(self, case: Case, *, keep: str) -> None:
        assert self.cache_dir is not None
        pattern = re.compile(rf"^{re.escape(_safe_name(case.case_id))}-[0-9a-f]{{16}}\.npz$")
        for p in self.cache_dir.iterdir():
            if pattern.match(p.name) and p.name != self.path_for(case, keep).name:
                p.unlink(missing_ok=True)


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)


def _write_npz(path: Path, volume: Volume) -> None:
    with atomic_writer(path) as f:
        np.savez(f, image=volume.image, label=volume.label, spacing=np.asarray(volume.spacing, dtype=np.float64))


def _read_npz(path: Path) -> Volume | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            spacing = z["spacing"]
            return Volume(image=z["image"], label=z["label"], spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])))
    except Exception as exc:  # a damaged cache entry is recomputed, never fatal
        logger.warning("cache entry %s unreadable (%s); recomputing", path, exc)
        return None
