"""The aggregator's store: a directory that holds all of its state.

The process keeps nothing that is not also here, so a restarted aggregator (or a new pod on the
same PersistentVolume) continues where the last one stopped. Every change is an atomic write:
a temporary file in the same directory, fsync, rename, fsync of the directory.

Layout::

    federation.json                  the federation's id and its configuration (JSON)
    state.json                       current round id, open/finished, opened_at, deadline
    sites.json                       sites that have joined
    counters.json                    bytes in/out, submissions, rejections by reason
    models/round-0001.frames         the global model round 1 trains from (codec frames, lossless)
    models/round-0002.frames         ... written when round 1 closes
    models/round-0003.from-0002.delta       a lossless delta from round 2's model to round 3's,
    models/round-0003.from-0002.delta.json  made on the first download that asks for it; its
                                     record is written last (a cache: rebuilt when missing or damaged)
    rounds/0001/<site>.frames        a site's committed update for round 1 (as received)
    rounds/0001/<site>.json          its header, digest and checks; written last: the commit marker
    rounds/0001/_result.json         weights, factors and the new model's digest, written at close
    spool/*.part                     uploads in progress; anything here at start-up is garbage
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from aggregator_service.errors import StoreError
from codec import atomic_write_bytes, fsync_dir, remove_temporaries


class _Record(Protocol):
    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R")

# How an operator recovers each kind of file when it is damaged (named in the refusal).
_RECOVERY = {
    "state.json": "restore it from a backup of the store, or start a new federation in an empty --store",
    "counters.json": "delete it: the counters then start again from zero, nothing else is lost",
    "sites.json": "delete it: sites are added again as they join",
    "federation.json": "restore it from a backup of the store, or start a new federation in an empty --store",
}
_RECOVERY_SUBMISSION = "delete it and its .frames file: that site's update is then missing and it can upload again"
_RECOVERY_MODEL = "restore models/ from a backup of the store, or start a new federation in an empty --store"


def recovery_hint(path: Path) -> str:
    """What to do about a damaged store file (for the message that names it)."""
    if path.name in _RECOVERY:
        return _RECOVERY[path.name]
    if path.parent.parent.name == "rounds" and not path.name.startswith("_"):
        return _RECOVERY_SUBMISSION
    if ".delta" in path.name:
        return "delete it: the delta is a cache, rebuilt on the next download that asks for it"
    if path.parent.name == "models":
        return _RECOVERY_MODEL
    return "restore it from a backup of the store"


class Store:
    """Paths and atomic reads/writes of the aggregator's directory. Holds no state of its own."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("models", "rounds", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- paths -------------------------------------------------------------------------------
    def model_path(self, round_id: int) -> Path:
        """The global model that round ``round_id`` trains from (round r's result is round r+1's model)."""
        return self.root / "models" / f"round-{round_id:04d}.frames"

    def round_dir(self, round_id: int) -> Path:
        return self.root / "rounds" / f"{round_id:04d}"

    def submission_paths(self, round_id: int, site: str) -> tuple[Path, Path]:
        """(frames, record) of a site's submission; the record's presence means committed."""
        base = self.round_dir(round_id)
        return base / f"{site}.frames", base / f"{site}.json"

    # -- JSON documents ---------------------------------------------------------------------
    def read_json(self, name: str | Path, default: Any = None) -> Any:
        path = self.root / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return default

    def write_json(self, name: str | Path, value: Any) -> None:
        atomic_write_bytes(self.root / name, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())

    def read_record(self, name: str | Path, parse: Callable[[Any], R], default: R | None = None) -> R | None:
        """A typed record (``parse`` is its ``from_json``), or ``default`` when the file is missing.

        Raises:
            StoreError: the file is not JSON or not the record's shape; the message names the
                file, what is wrong, and how to recover.
        """
        path = self.root / name
        try:
            text = path.read_text()
        except FileNotFoundError:
            return default
        try:
            return parse(json.loads(text))
        except (ValueError, TypeError, AttributeError) as exc:  # json's and records' errors are ValueErrors
            raise StoreError(f"store file {path} is damaged ({exc}); {recovery_hint(path)}") from None

    def write_record(self, name: str | Path, record: _Record) -> None:
        self.write_json(name, record.to_json())

    # -- submissions ------------------------------------------------------------------------
    def committed_sites(self, round_id: int) -> list[str]:
        """Sites whose submission for the round is committed, in name order (the aggregation order)."""
        base = self.round_dir(round_id)
        if not base.is_dir():
            return []
        sites = []
        for record in base.glob("*.json"):
            # Site names never start with "_" (see errors.check_site_name), so "_result" is not a site.
            if record.name.startswith("_"):
                continue
            if (base / f"{record.stem}.frames").exists():
                sites.append(record.stem)
        return sorted(sites)

    def result_path(self, round_id: int) -> Path:
        return self.round_dir(round_id) / "_result.json"

    def read_submission(self, round_id: int, site: str) -> dict[str, Any] | None:
        """A submission's record as stored (plain JSON; rounds.py reads it as a ``records.Submission``)."""
        return self.read_json(self.submission_paths(round_id, site)[1].relative_to(self.root))

    def new_spool_path(self) -> Path:
        return self.root / "spool" / f"{uuid.uuid4().hex}.part"

    def commit_submission(self, spool: Path, round_id: int, site: str, record: _Record) -> None:
        """Move a verified spool file into the round and write its record (the commit marker) last."""
        frames_path, record_path = self.submission_paths(round_id, site)
        frames_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spool, frames_path)
        fsync_dir(frames_path.parent)
        self.write_record(record_path.relative_to(self.root), record)

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files of atomic writes a killed process left behind (a model-sized
        file per crash during a close); call at start-up only. Returns what was removed."""
        directories = [self.root, self.root / "models", *sorted((self.root / "rounds").glob("*/"))]
        return [tmp for directory in directories for tmp in remove_temporaries(directory)]

    def clear_spool(self) -> int:
        """Remove uploads that were in progress when a previous process died. Returns how many."""
        removed = 0
        for part in (self.root / "spool").glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        return removed
