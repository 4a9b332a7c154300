"""What a model download sends: the full global model, or a lossless delta from the one the site holds.

A site that says it holds round h's global model (``DownloadModelRequest.have_round``) and asks
for round r > h gets :func:`codec.encode_model_delta` from h's model to r's when that is smaller
than r's model; with sparse (top-k) aggregation only a few percent of the values change per round,
so it is much smaller. The site rebuilds r's model, re-encodes it losslessly and checks it against
the full model's digest, so it never trains from a model it could not verify (and falls back to
the full download when the check fails).

Deltas are computed on the first download that asks for one and cached in the store, beside the
models (the store stays the only state); only from the previous round's model, and building the
delta to round r removes those to earlier rounds, so the cache holds about one delta::

    models/round-0003.from-0002.delta        the delta's frames (a frame file, written atomically)
    models/round-0003.from-0002.delta.json   its record, written last: the commit marker

A cached delta is used only when its record names the current digests of both models and its
frames still hash to the recorded digest; anything else (missing, half-written, garbage) is
computed again. The full model is sent when the site holds nothing, a round that is not the previous one,
a round the store no longer has, a model whose digest differs from the store's, or when the delta
would not be smaller.

Plain functions over the store, like ``rounds.py``; the servicer calls :func:`choose_download`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import codec
from aggregator_service import rounds
from aggregator_service.errors import AggregatorError, StoreError
from aggregator_service.records import DeltaRecord
from aggregator_service.store import Store

log = logging.getLogger(__name__)

__all__ = ["ModelDownload", "choose_download", "delta_paths", "ensure_delta", "iter_frames"]

# One builder per (store, base round, round): sites that ask for the same delta at once wait for
# the first to write it instead of each computing it (memory stays flat in the number of sites).
_builders: dict[tuple[str, int, int], threading.Lock] = {}
_builders_guard = threading.Lock()


@dataclass(frozen=True)
class ModelDownload:
    """What a download streams.

    Attributes:
        round_id: the round whose global model this is.
        model_digest: SHA-256 (hex) of the full model's frames (also for a delta: the digest of
            the model it rebuilds).
        delta_from_round: 0 for the full model, else the round whose model the delta applies to.
        path: the frame file to stream.
        nbytes: the file's size in bytes.
    """

    round_id: int
    model_digest: str
    delta_from_round: int
    path: Path
    nbytes: int


def iter_frames(path: Path) -> Iterator[bytes]:
    """The frames of a model or delta file, one at a time."""
    with open(path, "rb") as fh:
        yield from codec.read_frames(fh)


def delta_paths(store: Store, base_round: int, round_id: int) -> tuple[Path, Path]:
    """(frames, record) of the cached delta from ``base_round``'s model to ``round_id``'s."""
    frames = store.root / "models" / f"round-{round_id:04d}.from-{base_round:04d}.delta"
    return frames, frames.with_name(frames.name + ".json")


def _cached(store: Store, base_round: int, round_id: int, base_digest: str, model_digest: str) -> DeltaRecord | None:
    """The record of a usable cached delta, or None (missing, stale or damaged: build it again)."""
    frames, record_path = delta_paths(store, base_round, round_id)
    try:
        record = store.read_record(record_path.relative_to(store.root), DeltaRecord.from_json)
    except (StoreError, OSError):  # a damaged record is only a lost cache entry
        return None
    if record is None:
        return None
    if record.base_digest != base_digest or record.model_digest != model_digest:
        return None
    if not record.reproducible:
        return record  # nothing to stream: the full model is sent
    try:
        if frames.stat().st_size != record.bytes or codec.file_digest(frames) != record.delta_digest:
            raise codec.CodecError("frames do not match the record")
    except (OSError, codec.CodecError) as exc:
        log.warning("cached delta %s is unusable (%s); computing it again", frames.name, exc)
        return None
    return record


def _build(store: Store, base_round: int, round_id: int, base_digest: str, model_digest: str) -> DeltaRecord:
    """Compute the delta from the two model files and cache it (frames first, then the record).

    The new model is also re-encoded losslessly on the way (one tensor at a time) and hashed:
    only when that reproduces the stored file's digest can a site rebuild a model it can verify
    (a file written by another codec version would not), and the delta is marked reproducible.
    """
    frames_path, record_path = delta_paths(store, base_round, round_id)
    reencoded = codec.DigestingFrames()

    def new_tensors(fh: Any) -> Iterator[tuple[str, np.ndarray]]:
        for name, array in codec.decode_frames(codec.read_frames(fh)):
            for frame in codec.encode_tensors([(name, array)], codec.LOSSLESS):
                reencoded.update(frame)
            yield name, array

    with open(store.model_path(base_round), "rb") as old_fh, open(store.model_path(round_id), "rb") as new_fh:
        old = codec.decode_frames(codec.read_frames(old_fh))
        delta = codec.DigestingFrames(codec.encode_model_delta(old, new_tensors(new_fh)))
        with codec.atomic_writer(frames_path) as out:
            nbytes = codec.write_frames(out, delta)
    reproducible = reencoded.hexdigest() == model_digest
    if not reproducible:
        log.warning(
            "round %d's model does not re-encode to its stored digest (written by another codec version?); "
            "sites get the full model instead of a delta from round %d", round_id, base_round,
        )
        frames_path.unlink(missing_ok=True)
    record = DeltaRecord(
        base_round=base_round,
        round_id=round_id,
        base_digest=base_digest,
        model_digest=model_digest,
        delta_digest=delta.hexdigest() if reproducible else "",
        bytes=nbytes if reproducible else 0,
        reproducible=reproducible,
    )
    store.write_record(record_path.relative_to(store.root), record)
    return record


def _builder_lock(store: Store, base_round: int, round_id: int) -> threading.Lock:
    key = (str(store.root.resolve()), base_round, round_id)
    with _builders_guard:
        return _builders.setdefault(key, threading.Lock())


def ensure_delta(store: Store, base_round: int, round_id: int) -> DeltaRecord:
    """The record of the delta from ``base_round``'s model to ``round_id``'s, computing it if needed.

    Returns the record (``reproducible``, ``bytes``, ``delta_digest``, both models' digests); the
    frames are at ``delta_paths(store, base_round, round_id)[0]`` when ``reproducible``.

    Raises:
        NotFound: either model is not in the store.
        codec.CodecError, OSError: a model file cannot be read or the models do not match.
    """
    base_digest = rounds.read_manifest(store, base_round).digest
    model_digest = rounds.read_manifest(store, round_id).digest
    record = _cached(store, base_round, round_id, base_digest, model_digest)
    if record is not None:
        return record
    with _builder_lock(store, base_round, round_id):
        # Another download may have built it while this one waited.
        record = _cached(store, base_round, round_id, base_digest, model_digest)
        if record is None:
            record = _build(store, base_round, round_id, base_digest, model_digest)
            evict_deltas(store, keep_from=round_id)
        return record


def evict_deltas(store: Store, *, keep_from: int) -> list[Path]:
    """Remove cached deltas to models of rounds before ``keep_from`` (record first, then frames):
    sites that still hold such a round download the full model. Returns what was removed."""
    removed = []
    for record in sorted((store.root / "models").glob("round-*.from-*.delta.json")):
        try:
            target = int(record.name[len("round-"):len("round-") + 4])
        except ValueError:
            continue
        if target < keep_from:
            frames = record.with_name(record.name[: -len(".json")])
            for path in (record, frames):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def choose_download(
    store: Store, round_id: int, model_path: Path, model_digest: str, *, have_round: int = 0, have_digest: str = ""
) -> ModelDownload:
    """Decide what a download of ``round_id``'s model (at ``model_path``) streams to a site.

    Args:
        round_id, model_path, model_digest: the model the site asked for, as
            :func:`rounds.model_for_download` resolved it.
        have_round: the round whose model the site holds (0: none).
        have_digest: the digest of the model the site holds ("" : not checked here; the site
            then finds a wrong base when it applies the delta, and downloads the full model).

    Returns the delta when it applies and is smaller, else the full model. Never raises for a
    delta that cannot be made: that is logged and the full model is sent.
    """
    full = ModelDownload(round_id, model_digest, 0, model_path, model_path.stat().st_size)
    # Only from the round just before: a site may name any older round, and a delta per pair of
    # rounds would grow the store with the square of the rounds.
    if have_round != round_id - 1 or not store.model_path(have_round).exists():
        return full
    try:
        if have_digest and have_digest != rounds.read_manifest(store, have_round).digest:
            log.info("a site holds a round %d model that is not the store's; sending round %d in full",
                     have_round, round_id)
            return full
        record = ensure_delta(store, have_round, round_id)
    except (AggregatorError, codec.CodecError, OSError) as exc:
        log.warning("no delta from round %d to round %d (%s); sending the full model", have_round, round_id, exc)
        return full
    if not record.reproducible or record.bytes >= full.nbytes:
        return full
    return ModelDownload(round_id, model_digest, have_round, delta_paths(store, have_round, round_id)[0],
                         record.bytes)
