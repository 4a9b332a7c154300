"""The round lifecycle as plain functions over the store.

Each function takes the store and the federation configuration and reads or writes the store;
none keeps anything in memory between calls, so a restarted process continues the same round.
The servicer (``servicer.py``) only turns requests into these calls and their errors into gRPC
statuses; :class:`aggregator_service.server.Aggregator` serialises the state changes with a lock.

A round r:  open (submissions committed one by one) -> close (when ``max_clients`` committed, or the
deadline passed with at least ``min_clients``) -> the global model of round r+1 is written, then
round r's result, then ``state.json`` moves to round r+1 (or ``finished`` after the last round).
A crash between those writes leaves round r open in ``state.json``; closing it again is a
deterministic function of the stored submissions, so it writes the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

import codec
from aggregator_service import aggregation
from aggregator_service.aam import SiteStats
from aggregator_service.config import FederationConfig
from aggregator_service.errors import (
    ConflictingSubmission,
    InvalidUpdate,
    NotFound,
    StoreError,
    UnknownSite,
    UpdateTooLarge,
    WrongRound,
    check_site_name,
)
from aggregator_service.store import Store
from codec.frame import FrameHeader, unpack_frame
from codec.stream import decode_part

log = logging.getLogger(__name__)

OPEN = "open"
FINISHED = "finished"
METRIC_NAMES = ("dice", "hd95", "iou", "precision", "recall", "train_loss", "train_seconds")


@dataclass(frozen=True)
class RoundView:
    """What ``GetRound`` reports; read from the store."""

    round_id: int
    state: str  # OPEN or FINISHED
    deadline: float
    min_clients: int
    max_clients: int
    total_rounds: int
    global_model_digest: str
    submitted_sites: tuple[str, ...]


@dataclass(frozen=True)
class UpdateHeader:
    """The first message of an upload, as domain values."""

    site: str
    round_id: int
    sample_count: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extra_metrics: Mapping[str, float] = field(default_factory=dict)
    codec: Mapping[str, Any] = field(default_factory=dict)
    bytes_downloaded: int = 0


@dataclass(frozen=True)
class UpdateCommit:
    """The last message of an upload."""

    chunk_count: int
    digest: str


@dataclass(frozen=True)
class Receipt:
    round_id: int
    digest: str
    bytes_received: int
    duplicate: bool
    submissions: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


# ---------------------------------------------------------------------------------------------
# federation start-up


def initialize(store: Store, config: FederationConfig, initial_model: Path | None, *, now: float) -> None:
    """Start a new federation in an empty store, or check that a used store belongs to this one.

    A new federation needs the global model round 1 trains from (``fedseg init-model`` writes one).
    """
    existing = store.read_json("federation.json")
    if existing is not None:
        if existing.get("config") != config.to_json():
            raise StoreError(
                f"store {store.root} holds federation {existing.get('federation_id')!r} with a different "
                "configuration; start with the configuration it was created with, or use a new --store"
            )
        dropped = store.clear_spool()
        if dropped:
            log.info("removed %d incomplete upload(s) left by a previous process", dropped)
        return
    if initial_model is None:
        raise StoreError(
            f"store {store.root} is empty and no initial model was given: pass --initial-model "
            "(made with `fedseg init-model --config FEDERATION.toml --out FILE`)"
        )
    manifest = _verify_model_file(initial_model)
    with codec.atomic_writer(store.model_path(1)) as out, open(initial_model, "rb") as src:
        while block := src.read(1 << 20):
            out.write(block)
    _write_manifest(store, 1, manifest)
    store.write_json("sites.json", [])
    store.write_json("counters.json", _empty_counters())
    store.write_json(
        "federation.json",
        {"federation_id": config.federation_id, "config": config.to_json(), "created_at": now},
    )
    # state.json last: its presence means the federation is fully initialised.
    _open_round(store, config, 1, now=now)


def _verify_model_file(path: Path) -> list[TensorSpec]:
    """Decode a whole model file (lossless frames) and check every tensor is finite."""
    specs = []
    try:
        with open(path, "rb") as fh:
            for name, array in codec.decode_frames(codec.read_frames(fh)):
                if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                    raise StoreError(f"initial model {path}: tensor {name!r} has NaN or Inf values")
                specs.append(TensorSpec(name, tuple(array.shape), array.dtype.str))
    except FileNotFoundError:
        raise StoreError(f"initial model {path} does not exist") from None
    except codec.CodecError as exc:
        raise StoreError(f"initial model {path} is not a valid FedSegNet model file: {exc}") from None
    if not specs:
        raise StoreError(f"initial model {path} holds no tensors")
    return specs


def frames_digest(path: Path) -> str:
    """SHA-256 of a frame file's frames concatenated in order: the digest the wire carries."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for frame in codec.read_frames(fh):
            sha.update(frame)
    return sha.hexdigest()


def _write_manifest(store: Store, round_id: int, specs: Sequence[TensorSpec], digest: str | None = None) -> None:
    """Record a model file's tensors and digest (computed from the file unless the writer hashed it)."""
    path = store.model_path(round_id)
    store.write_json(
        path.with_suffix(".json").relative_to(store.root),
        {
            "digest": digest or frames_digest(path),
            "bytes": path.stat().st_size,
            "tensors": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs],
        },
    )


def read_manifest(store: Store, round_id: int) -> dict[str, Any]:
    manifest = store.read_json(store.model_path(round_id).with_suffix(".json").relative_to(store.root))
    if manifest is None:
        raise NotFound(f"no global model for round {round_id}")
    return manifest


def _empty_counters() -> dict[str, Any]:
    return {"bytes_in": 0, "bytes_out": 0, "submissions_total": 0, "rejections": {}}


def _open_round(store: Store, config: FederationConfig, round_id: int, *, now: float) -> None:
    store.write_json(
        "state.json",
        {"round_id": round_id, "state": OPEN, "opened_at": now, "deadline": now + config.round_timeout_s},
    )


# ---------------------------------------------------------------------------------------------
# reads


def read_state(store: Store) -> dict[str, Any]:
    state = store.read_json("state.json")
    if state is None:
        raise StoreError(f"store {store.root} is not initialised")
    return state


def current_round(store: Store, config: FederationConfig) -> RoundView:
    state = read_state(store)
    round_id = int(state["round_id"])
    finished = state["state"] == FINISHED
    # Once finished, the digest is that of the final model (written by the last round's close).
    digest = read_manifest(store, round_id + 1 if finished else round_id)["digest"]
    return RoundView(
        round_id=round_id,
        state=state["state"],
        deadline=float(state["deadline"]),
        min_clients=config.min_clients,
        max_clients=config.max_clients,
        total_rounds=config.rounds,
        global_model_digest=digest,
        submitted_sites=tuple(store.committed_sites(round_id)),
    )


def join(store: Store, config: FederationConfig, site: str) -> RoundView:
    """Register a site (idempotent). Only sites in the configuration may join when it lists any."""
    check_site_name(site)
    if config.sites and site not in config.sites:
        raise UnknownSite(f"site {site!r} is not in this federation; known sites: {', '.join(config.sites)}")
    sites = store.read_json("sites.json", [])
    if site not in sites:
        store.write_json("sites.json", sorted({*sites, site}))
    return current_round(store, config)


def model_for_download(store: Store, round_id: int) -> tuple[int, Path, str]:
    """The model file a download of ``round_id`` streams (0: the current round, or the final model)."""
    state = read_state(store)
    if round_id == 0:
        round_id = int(state["round_id"]) + (1 if state["state"] == FINISHED else 0)
    path = store.model_path(round_id)
    if not path.exists():
        raise NotFound(
            f"no global model for round {round_id}; the current round is {state['round_id']} ({state['state']})"
        )
    return round_id, path, read_manifest(store, round_id)["digest"]


def iter_model_frames(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from codec.read_frames(fh)


def record_bytes_out(store: Store, nbytes: int) -> None:
    counters = store.read_json("counters.json", _empty_counters())
    counters["bytes_out"] += int(nbytes)
    store.write_json("counters.json", counters)


def record_rejection(store: Store, reason: str) -> None:
    counters = store.read_json("counters.json", _empty_counters())
    counters["rejections"][reason] = counters["rejections"].get(reason, 0) + 1
    store.write_json("counters.json", counters)


def status(store: Store, config: FederationConfig) -> dict[str, Any]:
    view = current_round(store, config)
    counters = store.read_json("counters.json", _empty_counters())
    completed = view.round_id if view.state == FINISHED else view.round_id - 1
    return {
        "federation_id": config.federation_id,
        "round": view,
        "rounds_completed": completed,
        "sites_seen": store.read_json("sites.json", []),
        "strategy": config.strategy,
        **counters,
    }


def round_metrics(store: Store, config: FederationConfig, round_id: int) -> dict[str, Any]:
    """Per-site metrics, weights and the aggregate of a round (0: the last closed round)."""
    state = read_state(store)
    current = int(state["round_id"])
    if round_id == 0:
        round_id = current if state["state"] == FINISHED else current - 1
        if round_id < 1:
            raise NotFound("no round has closed yet; round 1 is open")
    if round_id > current or round_id < 1:
        raise NotFound(f"round {round_id} does not exist; the current round is {current}")
    result = store.read_json(store.result_path(round_id).relative_to(store.root))
    sites = []
    for site in store.committed_sites(round_id):
        record = store.read_submission(round_id, site) or {}
        part = (result or {}).get("sites", {}).get(site, {})
        sites.append({**record, "weight": part.get("weight", 0.0), "weight_factors": part.get("factors", {})})
    return {
        "round_id": round_id,
        "closed": result is not None,
        "sites": sites,
        "aggregate": _aggregate_metrics(sites),
        "result": result,
    }


def _aggregate_metrics(sites: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Sample-weighted mean of the sites' local metrics (finite values only)."""
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        pairs = [(s["sample_count"], s["metrics"][name]) for s in sites if name in s.get("metrics", {})]
        pairs = [(n, v) for n, v in pairs if math.isfinite(v)]
        total = sum(n for n, _ in pairs)
        if total > 0:
            out[name] = sum(n * v for n, v in pairs) / total
    return out


# ---------------------------------------------------------------------------------------------
# submissions


@dataclass
class _Upload:
    """What the spooling pass measured about one upload stream."""

    sha: Any = field(default_factory=hashlib.sha256)
    chunks: int = 0
    nbytes: int = 0
    commit: UpdateCommit | None = None


def check_header(store: Store, config: FederationConfig, header: UpdateHeader) -> dict[str, Any]:
    """Refuse an upload early, before any frame is read. Returns the round's model manifest."""
    check_site_name(header.site)
    if config.sites and header.site not in config.sites:
        raise UnknownSite(f"site {header.site!r} is not in this federation")
    state = read_state(store)
    if state["state"] == FINISHED:
        raise WrongRound(f"the federation finished after round {state['round_id']}; no update is accepted")
    if header.round_id != int(state["round_id"]):
        raise WrongRound(
            f"update for round {header.round_id} refused: the current round is {state['round_id']}"
        )
    if header.sample_count < 1:
        raise InvalidUpdate(f"sample_count must be >= 1, got {header.sample_count}", reason="bad_header")
    for name, value in {**header.metrics, **header.extra_metrics}.items():
        if not math.isfinite(value):
            raise InvalidUpdate(f"metric {name!r} is not finite ({value})", reason="bad_header")
    return read_manifest(store, header.round_id)


def max_update_bytes(config: FederationConfig, manifest: Mapping[str, Any]) -> int:
    """The configured limit, or by default twice the dense fp32 model plus framing slack."""
    if config.max_update_bytes:
        return config.max_update_bytes
    dense = sum(4 * math.prod(t["shape"]) for t in manifest["tensors"])
    return 2 * dense + (1 << 20)


def _checked_frames(
    parts: Iterable[bytes | UpdateCommit], manifest: Mapping[str, Any], limit: int, upload: _Upload
) -> Iterator[bytes]:
    """Pass frames through while checking them against the global model's tensors, in order."""
    tensors = manifest["tensors"]
    index = -1  # position in the manifest of the tensor being received
    part = 0
    parts_total = 0
    for item in parts:
        if isinstance(item, UpdateCommit):
            upload.commit = item
            return
        upload.nbytes += len(item)
        if upload.nbytes > limit:
            raise UpdateTooLarge(f"update exceeds the limit of {limit} bytes")
        try:
            header = codec.read_header(item)
        except codec.CodecError as exc:
            raise InvalidUpdate(f"frame {upload.chunks}: {exc}", reason="bad_frame") from None
        if header.part == 0:
            if index >= 0 and part != parts_total - 1:
                raise InvalidUpdate(
                    f"tensor {tensors[index]['name']!r} ended after part {part + 1} of {parts_total}",
                    reason="bad_frame",
                )
            index += 1
            if index >= len(tensors):
                raise InvalidUpdate(
                    f"unexpected tensor {header.name!r}: the model has only {len(tensors)} tensors",
                    reason="tensor_mismatch",
                )
            want = tensors[index]
            got = (header.name, list(header.shape), np.dtype(header.dtype).str)
            if got != (want["name"], want["shape"], want["dtype"]):
                raise InvalidUpdate(
                    f"tensor {index} is {header.name!r} {list(header.shape)} {np.dtype(header.dtype).name}, "
                    f"the model's is {want['name']!r} {want['shape']} {np.dtype(want['dtype']).name}",
                    reason="tensor_mismatch",
                )
            part, parts_total = 0, header.parts
        elif index < 0 or header.name != tensors[index]["name"] or header.part != part + 1:
            raise InvalidUpdate(
                f"frame {upload.chunks} ({header.name!r} part {header.part}) is out of order", reason="bad_frame"
            )
        else:
            part = header.part
        upload.sha.update(item)
        upload.chunks += 1
        yield item
    raise InvalidUpdate("the upload stream ended without its commit message", reason="incomplete_stream")


def _verify_update(path: Path, manifest: Mapping[str, Any]) -> float:
    """Decode the spooled update part by part (never densified): every tensor present, finite.

    Returns ‖Δ‖. Unsent positions of a sparse update are zeros, so the norm of the sent values is
    the norm of the whole update.
    """
    try:
        with open(path, "rb") as fh:
            summary = codec.verify_frames(codec.read_frames(fh))
    except codec.CodecError as exc:
        raise InvalidUpdate(str(exc), reason="bad_frame") from None
    total = 0.0
    for name, info in summary.items():
        if info.dtype.kind == "f":
            if not info.finite:
                raise InvalidUpdate(f"tensor {name!r} has NaN or Inf values", reason="non_finite")
            total += info.sq_norm
    if len(summary) != len(manifest["tensors"]):
        raise InvalidUpdate(
            f"update holds {len(summary)} tensors, the model has {len(manifest['tensors'])}", reason="tensor_mismatch"
        )
    return math.sqrt(total)


def spool_update(
    store: Store,
    config: FederationConfig,
    header: UpdateHeader,
    parts: Iterable[bytes | UpdateCommit],
) -> tuple[Path, dict[str, Any]]:
    """Write an upload to the spool and verify it, without touching the round.

    Returns the spool file and the submission record to commit. On any error the spool file is
    removed, so a broken or refused stream leaves nothing behind.
    """
    manifest = check_header(store, config, header)
    upload = _Upload()
    spool = store.new_spool_path()
    try:
        with open(spool, "wb") as fh:
            codec.write_frames(fh, _checked_frames(parts, manifest, max_update_bytes(config, manifest), upload))
            fh.flush()
            os.fsync(fh.fileno())
        commit = upload.commit
        assert commit is not None  # _checked_frames raises when the stream ends without one
        digest = upload.sha.hexdigest()
        if commit.chunk_count != upload.chunks:
            raise InvalidUpdate(
                f"commit says {commit.chunk_count} chunks but {upload.chunks} arrived", reason="incomplete_stream"
            )
        if commit.digest and commit.digest != digest:
            raise InvalidUpdate(
                f"commit digest {commit.digest[:16]}… does not match the frames received ({digest[:16]}…)",
                reason="digest_mismatch",
            )
        norm = _verify_update(spool, manifest)
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    record = {
        "site": header.site,
        "round_id": header.round_id,
        "sample_count": header.sample_count,
        "metrics": dict(header.metrics),
        "extra_metrics": dict(header.extra_metrics),
        "codec": dict(header.codec),
        "bytes_downloaded": header.bytes_downloaded,
        "digest": digest,
        "bytes": upload.nbytes,
        "chunks": upload.chunks,
        "update_norm": norm,
    }
    return spool, record


def commit_update(
    store: Store, config: FederationConfig, spool: Path, record: dict[str, Any], *, now: float
) -> Receipt:
    """Make a verified upload part of its round (call under the aggregator's lock)."""
    round_id = int(record["round_id"])
    site = record["site"]
    try:
        state = read_state(store)
        if state["state"] == FINISHED or int(state["round_id"]) != round_id:
            raise WrongRound(
                f"round {round_id} closed while the update was uploading; the current round is "
                f"{state['round_id']} ({state['state']})"
            )
        existing = store.read_submission(round_id, site)
        if existing is not None:
            if existing["digest"] != record["digest"]:
                raise ConflictingSubmission(
                    f"site {site!r} already submitted a different update for round {round_id} "
                    f"(digest {existing['digest'][:16]}…)"
                )
            spool.unlink(missing_ok=True)
            return Receipt(round_id, existing["digest"], existing["bytes"], True, len(store.committed_sites(round_id)))
        store.commit_submission(spool, round_id, site, {**record, "committed_at": now})
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    counters = store.read_json("counters.json", _empty_counters())
    counters["bytes_in"] += record["bytes"]
    counters["submissions_total"] += 1
    store.write_json("counters.json", counters)
    return Receipt(round_id, record["digest"], record["bytes"], False, len(store.committed_sites(round_id)))


# ---------------------------------------------------------------------------------------------
# closing a round


def site_stats(record: Mapping[str, Any]) -> SiteStats:
    """A strategy's view of one committed submission (its record in the store)."""
    metrics = record.get("metrics", {})
    return SiteStats(
        site=record["site"],
        sample_count=int(record["sample_count"]),
        dice=metrics.get("dice"),
        hd95=metrics.get("hd95"),
        update_norm=float(record["update_norm"]),
        finite=True,  # non-finite updates are refused at submission
    )


def due_to_close(store: Store, config: FederationConfig, *, now: float) -> bool:
    state = read_state(store)
    if state["state"] == FINISHED:
        return False
    count = len(store.committed_sites(int(state["round_id"])))
    return count >= config.max_clients or (now >= float(state["deadline"]) and count >= config.min_clients)


class _SiteReader:
    """One site's committed update, read tensor by tensor while its round closes.

    Between tensors it holds only the open file (and its 8 KiB read buffer): frames are read, decoded
    and added one at a time, and nothing decoded outlives its part. Closing a round with K sites
    thus keeps K small buffers, not K decoded frames.
    """

    def __init__(self, site: str, path: Path, round_id: int) -> None:
        self.site = site
        self.round_id = round_id
        self._fh = open(path, "rb")  # noqa: SIM115 - open across calls; closed by close()
        self._frames = codec.read_frames(self._fh)

    def close(self) -> None:
        self._fh.close()

    def _corrupt(self, message: str) -> StoreError:
        # Uploads are fully checked when spooled: a mismatch here means the store was damaged.
        return StoreError(f"round {self.round_id}: {self.site}'s stored update is damaged: {message}")

    def headers(self, spec: TensorSpec) -> Iterator[tuple[FrameHeader, memoryview]]:
        """This site's frames of tensor ``spec``, checked against it, as (header, stored payload).

        Yields exactly the tensor's parts, in order; the payload view is valid until the next one.
        """
        part = 0
        stop = 0
        while True:
            try:
                frame = next(self._frames)
                header, stored = unpack_frame(frame)
            except StopIteration:
                raise self._corrupt(f"it ends before tensor {spec.name!r}") from None
            except codec.CodecError as exc:
                raise self._corrupt(str(exc)) from None
            if (header.name, header.shape, header.dtype.str) != (spec.name, spec.shape, spec.dtype):
                raise self._corrupt(
                    f"{header.name!r} {list(header.shape)} {header.dtype} where the model has "
                    f"{spec.name!r} {list(spec.shape)} {np.dtype(spec.dtype)}"
                )
            if header.part != part or header.start != stop:
                raise self._corrupt(f"{header.what} is out of order")
            yield header, stored
            del frame, stored
            part, stop = part + 1, header.stop
            if part == header.parts:
                if stop != header.count:
                    raise self._corrupt(f"{header.what} stops at {stop} of {header.count} positions")
                return

    def parts(self, spec: TensorSpec, decompressor: zstandard.ZstdDecompressor) -> Iterator[codec.DecodedPart]:
        """This site's decoded parts of tensor ``spec``, one at a time (each valid until the next)."""
        for header, stored in self.headers(spec):
            try:
                yield decode_part(header, stored, decompressor)
            except codec.CodecError as exc:
                raise self._corrupt(str(exc)) from None

    def skip(self, spec: TensorSpec) -> None:
        """Pass over this site's frames of tensor ``spec`` without decoding them."""
        for _ in self.headers(spec):
            pass


class SiteTensor:
    """One site's update of one tensor, decoded part by part when it is used (sparse stays sparse).

    Use it once: :meth:`add_to` or :meth:`dense` reads the site's frames of the tensor; whatever
    was not used is skipped by :meth:`finish`, so the next tensor starts at the right frame.
    """

    def __init__(self, reader: _SiteReader, spec: TensorSpec, decompressor: zstandard.ZstdDecompressor) -> None:
        self._reader = reader
        self._spec = spec
        self._decompressor = decompressor
        self._read = False

    def _parts(self) -> Iterator[codec.DecodedPart]:
        if self._read:
            raise RuntimeError(f"{self._reader.site}'s update of {self._spec.name!r} was already read")
        self._read = True
        return self._reader.parts(self._spec, self._decompressor)

    def add_to(self, acc: np.ndarray, weight: float) -> None:
        """``acc += weight * Δ`` touching only the sent positions (``acc``: the tensor's shape, float)."""
        if not (acc.flags.c_contiguous and acc.flags.writeable) or acc.shape != self._spec.shape:
            raise ValueError(
                f"acc must be a writeable C-contiguous array of shape {self._spec.shape}, got {acc.shape}"
            )
        flat = acc.reshape(-1)
        for part in self._parts():
            aggregation.scatter_add(flat, part.values, weight, part.positions, part.header.start)

    def dense(self) -> np.ndarray:
        """Δ as a dense array of the tensor's shape and dtype (zeros where nothing was sent)."""
        out = np.zeros(self._spec.shape, dtype=self._spec.dtype)
        for part in self._parts():
            part.write_to(out)
        return out

    def finish(self) -> None:
        if not self._read:
            self._read = True
            self._reader.skip(self._spec)


def _write_model(path: Path, tensors: Iterable[tuple[str, np.ndarray]]) -> tuple[list[TensorSpec], str]:
    """Write a global model file atomically; return its tensors and the SHA-256 of its frames."""
    specs: list[TensorSpec] = []
    sha = hashlib.sha256()

    def described() -> Iterator[tuple[str, np.ndarray]]:
        for name, array in tensors:
            specs.append(TensorSpec(name, tuple(array.shape), array.dtype.str))
            yield name, array

    def hashed(frames: Iterator[bytes]) -> Iterator[bytes]:
        for frame in frames:
            sha.update(frame)
            yield frame

    # codec.LOSSLESS, not a faster spec: sites (and delta downloads) re-encode a model with it and
    # must get the same bytes, hence the same digest.
    with codec.atomic_writer(path) as fh:
        codec.write_frames(fh, hashed(codec.encode_tensors(described(), codec.LOSSLESS)))
    return specs, sha.hexdigest()


def close_round(store: Store, config: FederationConfig, *, now: float, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Aggregate the open round's submissions into the next global model and open the next round.

    Deterministic in what the store holds: sites are taken in name order, every tensor is
    accumulated in that order (see ``strategies.Strategy.apply``), and the model is written
    losslessly. Tensor by tensor, every site's frames of the tensor are read, decoded and added
    one frame at a time, so memory is a few copies of the largest tensor plus one small read
    buffer per site (times the number of sites for median and trimmed mean only, which need every
    site's dense values of a tensor at once).
    """
    started = clock()
    state = read_state(store)
    round_id = int(state["round_id"])
    sites = store.committed_sites(round_id)
    if not sites:
        raise WrongRound(f"round {round_id} has no submissions to aggregate")
    records = [store.read_submission(round_id, s) for s in sites]
    strategy = config.aggregation
    weights, factors = strategy.weights([site_stats(r) for r in records])
    state_in = strategy.load_state(store.model_path(round_id))
    src = store.model_path(round_id)
    dst = store.model_path(round_id + 1)

    def new_tensors() -> Generator[tuple[str, np.ndarray], None, None]:
        readers: list[_SiteReader] = []
        # One decompressor for every site: frames are decoded one at a time.
        decompressor = zstandard.ZstdDecompressor()
        try:
            for site in sites:
                readers.append(_SiteReader(site, store.submission_paths(round_id, site)[0], round_id))
            for name, theta in codec.decode_frames(iter_model_frames(src)):
                spec = TensorSpec(name, tuple(theta.shape), theta.dtype.str)
                deltas = [SiteTensor(reader, spec, decompressor) for reader in readers]
                new = strategy.apply(name, theta, iter(deltas), weights, state_in)
                for delta in deltas:  # what the strategy did not read (zero weights, integer tensors)
                    delta.finish()
                del deltas, theta
                yield name, new
                del new
        finally:
            for reader in readers:
                reader.close()

    tensors = new_tensors()
    try:
        specs, digest = _write_model(dst, tensors)
    finally:
        tensors.close()  # closes the sites' files now, also when writing failed
    strategy.save_state(dst, state_in)
    _write_manifest(store, round_id + 1, specs, digest)
    result = {
        "round_id": round_id,
        "strategy": config.strategy,
        "sites": {
            s: {"weight": float(w), "factors": f} for s, w, f in zip(sites, weights, factors)
        },
        "global_model_digest": digest,
        "closed_at": now,
        "close_seconds": clock() - started,
    }
    store.write_json(store.result_path(round_id).relative_to(store.root), result)
    if round_id >= config.rounds:
        store.write_json("state.json", {**state, "state": FINISHED})
    else:
        _open_round(store, config, round_id + 1, now=now)
    log.info(
        "round %d closed: %d site(s), weights %s, model %s… (%.2fs)",
        round_id, len(sites), {s: round(float(w), 4) for s, w in zip(sites, weights)}, digest[:12],
        result["close_seconds"],
    )
    return result
