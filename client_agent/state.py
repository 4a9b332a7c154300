"""A site's own state directory: what lets a restarted agent continue where it stopped.

Layout::

    agent.json                      site, federation, rounds submitted/refused, current residual file
    global-0003.frames              the global model round 3 trained from, byte-exact as the aggregator
                                    stores it (downloaded, or rebuilt from a delta and verified); the
                                    newest one is the base the next download may be a delta from
    local-0003.frames               the site's model after local training in round 3
    pending-0003.frames / .json     the encoded update for round 3 and its header, written before
                                    the upload starts, so a restart resends the same bytes
                                    (same digest: the aggregator counts it once)
    residual-0003.frames            the error-feedback residual left after round 3's update, and in
                                    the same file the site's other state that must change with it
                                    (names prefixed by their group, ``SITE_STATE_GROUPS``): the DGC
                                    velocity, each entry's rounds since it was last sent, and the local
                                    optimizer's state when the federation keeps it across rounds

``agent.json`` is the commit point: it names the residual in force, so a crash between writing a
new residual and the aggregator's receipt keeps the old one, and a residual is never lost.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, cast

import numpy as np

import codec
from codec import atomic_write_bytes, atomic_writer

log = logging.getLogger(__name__)

SITE_STATE_GROUPS = ("velocity", "age", "optimizer")
"""State kept in the residual file beside the residual, as ``GROUP/NAME`` tensors: it comes into
force (or is dropped) with the residual, atomically, and survives a SIGKILL the same way."""


def split_site_state(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """A residual file's tensors as (the residual, {group: {name: array}})."""
    residual: dict[str, np.ndarray] = {}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        group, sep, rest = name.partition("/")
        if sep and group in SITE_STATE_GROUPS:
            groups.setdefault(group, {})[rest] = array
        else:
            residual[name] = array
    return residual, groups


class SiteState:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- agent.json --------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "agent.json").read_text())
        except FileNotFoundError:
            return {"submitted": {}, "refused": {}, "residual": None}

    def save(self, doc: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.root / "agent.json", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    def is_done(self, round_id: int) -> bool:
        doc = self.load()
        return str(round_id) in doc["submitted"] or str(round_id) in doc["refused"]

    # -- files -------------------------------------------------------------------------------
    def path(self, kind: str, round_id: int) -> Path:
        return self.root / f"{kind}-{round_id:04d}.frames"

    def write_tensors(self, kind: str, round_id: int, tensors: Iterable[tuple[str, np.ndarray]]) -> Path:
        path = self.path(kind, round_id)
        with atomic_writer(path) as fh:
            codec.write_frames(cast(BinaryIO, fh), codec.encode_tensors(tensors, codec.LOSSLESS))
        return path

    def write_frames(self, kind: str, round_id: int, frames: Iterable[bytes]) -> Path:
        path = self.path(kind, round_id)
        with atomic_writer(path) as fh:
            codec.write_frames(cast(BinaryIO, fh), frames)
        return path

    def latest_global(self, before: int) -> tuple[int, Path] | None:
        """The newest global model file of a round before ``before`` as (round, path), or None.

        Only files that were verified reach this name (downloads are written to a temporary file
        and renamed after their digest checked), so it is the base a delta download starts from.
        """
        best: tuple[int, Path] | None = None
        for path in self.root.glob("global-*.frames"):
            number = path.stem.rpartition("-")[2]
            if number.isdigit() and int(number) < before and (best is None or int(number) > best[0]):
                best = (int(number), path)
        return best

    def read_tensors(self, kind: str, round_id: int) -> dict[str, np.ndarray]:
        return codec.load_tensors(self.path(kind, round_id))

    def residual(self) -> dict[str, np.ndarray] | None:
        """The residual in force (named by agent.json), or None before the first submission."""
        return self.site_state()[0]

    def site_state(self) -> tuple[dict[str, np.ndarray] | None, dict[str, dict[str, np.ndarray]]]:
        """The residual in force and the state stored with it (:data:`SITE_STATE_GROUPS`)."""
        name = self.load().get("residual")
        if not name:
            return None, {}
        return split_site_state(codec.load_tensors(self.root / name))

    # -- pending uploads ---------------------------------------------------------------------
    def pending(self, round_id: int) -> dict[str, Any] | None:
        """The encoded update of ``round_id`` waiting for its receipt, or None.

        None also when its frames are missing or no longer hash to the recorded digest (a
        damaged disk): the round is then trained and encoded afresh rather than sending bytes
        the aggregator would refuse.
        """
        try:
            header = json.loads((self.root / f"pending-{round_id:04d}.json").read_text())
        except FileNotFoundError:
            return None
        try:
            digest = self.frames_digest("pending", round_id)
        except (OSError, codec.CodecError) as exc:
            log.warning("round %d: pending update unreadable (%s); it will be encoded again", round_id, exc)
            return None
        if digest != header.get("digest"):
            log.warning("round %d: pending update does not match its digest; it will be encoded again", round_id)
            return None
        return header

    def pending_rounds(self) -> list[int]:
        """Rounds with an encoded update still waiting for its receipt, in order."""
        rounds = []
        for path in self.root.glob("pending-*.json"):
            number = path.stem.rpartition("-")[2]
            if number.isdigit():
                rounds.append(int(number))
        return sorted(rounds)

    def frames_digest(self, kind: str, round_id: int) -> str:
        """SHA-256 (hex) of a frames file's frames concatenated in order: an upload's identity."""
        return codec.file_digest(self.path(kind, round_id))

    def save_pending(self, round_id: int, header: Mapping[str, Any]) -> None:
        atomic_write_bytes(
            self.root / f"pending-{round_id:04d}.json", (json.dumps(header, indent=1, sort_keys=True) + "\n").encode()
        )

    def finish_round(self, round_id: int, *, receipt: Mapping[str, Any] | None, refusal: str | None = None) -> None:
        """Record the round's outcome; on success the round's new residual comes into force."""
        doc = self.load()
        if receipt is not None:
            doc["submitted"][str(round_id)] = dict(receipt)
            if self.path("residual", round_id).exists():
                doc["residual"] = self.path("residual", round_id).name
        else:
            # Refused: the update was not applied, so the old residual stays in force.
            doc["refused"][str(round_id)] = refusal or "refused"
        self.save(doc)
        (self.root / f"pending-{round_id:04d}.json").unlink(missing_ok=True)
        self.path("pending", round_id).unlink(missing_ok=True)
        if receipt is None:
            self.path("residual", round_id).unlink(missing_ok=True)
        self._prune(keep_from=round_id - 1)

    def _prune(self, *, keep_from: int) -> None:
        """Drop models and residuals of older rounds; keep the residual in force."""
        in_force = self.load().get("residual")
        for path in self.root.glob("*-*.frames"):
            kind, _, number = path.stem.rpartition("-")
            if kind in ("global", "local", "residual") and number.isdigit() and int(number) < keep_from:
                if path.name != in_force:
                    path.unlink(missing_ok=True)
