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

import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
from aggregator_service.records import (
    FINISHED,
    OPEN,
    Counters,
    FederationRecord,
    ModelManifest,
    RoundResult,
    RoundState,
    Submission,
    TensorSpec,
)
from aggregator_service.store import Store, recovery_hint
from codec.frame import FrameHeader, unpack_frame
from codec.stream import decode_part
from protos.fedsegnet.v1.local_metrics import (
    EXTRA_METRIC_RANGE,
    LOCAL_METRIC_NAMES,
    MAX_EXTRA_METRICS,
    MAX_EXTRA_NAME_CHARS,
    MAX_SAMPLE_COUNT,
    MAX_VALIDATION_CASES,
    METRIC_RANGES,
    check_metric,
)

log = logging.getLogger(__name__)

METRIC_NAMES = LOCAL_METRIC_NAMES


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


# ---------------------------------------------------------------------------------------------
# federation start-up


def initialize(store: Store, config: FederationConfig, initial_model: Path | None, *, now: float) -> None:
    """Start a new federation in an empty store, or check that a used store belongs to this one.

    A new federation needs the global model round 1 trains from (``fedseg init-model`` writes one).
    """
    existing = store.read_record("federation.json", FederationRecord.from_json)
    if existing is not None:
        if existing.config != config.to_json():
            raise StoreError(
                f"store {store.root} holds federation {existing.federation_id!r} with a different "
                "configuration; start with the configuration it was created with, or use a new --store"
            )
        dropped = store.clear_spool()
        if dropped:
            log.info("removed %d incomplete upload(s) left by a previous process", dropped)
        temporaries = store.remove_temporaries()
        if temporaries:
            log.info("removed %d temporary file(s) of writes a previous process did not finish: %s",
                     len(temporaries), ", ".join(str(p.relative_to(store.root)) for p in temporaries))
        verify_store(store)
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
    store.write_record("counters.json", Counters())
    store.write_record("federation.json", FederationRecord(config.federation_id, config.to_json(), now))
    # state.json last: its presence means the federation is fully initialised.
    _open_round(store, config, 1, now=now)


def verify_store(store: Store) -> None:
    """Check, before serving, everything a restarted aggregator will read from a used store.

    The JSON documents (state, counters, sites, every model manifest and round result) must parse
    as their records, and the models it will serve (the current round's, and the final one once
    finished) must hash to their manifests' digests. Submissions are not checked here: one that is
    damaged is left out when its round closes (see :func:`stored_submissions`).

    Raises:
        StoreError: naming the damaged file and how to recover.
    """
    state = read_state(store)
    read_counters(store)
    store.read_record("sites.json", _site_list)
    for manifest_path in sorted((store.root / "models").glob("round-[0-9][0-9][0-9][0-9].json")):
        store.read_record(manifest_path.relative_to(store.root), ModelManifest.from_json)
    for result_path in sorted((store.root / "rounds").glob("*/_result.json")):
        store.read_record(result_path.relative_to(store.root), RoundResult.from_json)
    served = [state.round_id] + ([state.round_id + 1] if state.finished else [])
    for round_id in served:
        path = store.model_path(round_id)
        try:
            manifest = read_manifest(store, round_id)
        except NotFound:
            raise StoreError(f"store file {path.with_suffix('.json')} is missing; {recovery_hint(path)}") from None
        try:
            digest = codec.file_digest(path)
        except (OSError, codec.CodecError) as exc:
            raise StoreError(f"store file {path} is damaged ({exc}); {recovery_hint(path)}") from None
        if digest != manifest.digest:
            raise StoreError(
                f"store file {path} is damaged (its frames hash to {digest[:16]}…, its manifest says "
                f"{manifest.digest[:16]}…); {recovery_hint(path)}"
            )


def _site_list(data: Any) -> list[str]:
    if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
        raise ValueError(f"expected a list of site names, got {str(data)[:80]}")
    return data


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


frames_digest = codec.file_digest


def _manifest_name(store: Store, round_id: int) -> Path:
    return store.model_path(round_id).with_suffix(".json").relative_to(store.root)


def _write_manifest(store: Store, round_id: int, specs: Sequence[TensorSpec], digest: str | None = None) -> None:
    """Record a model file's tensors and digest (computed from the file unless the writer hashed it)."""
    path = store.model_path(round_id)
    manifest = ModelManifest(digest or codec.file_digest(path), path.stat().st_size, tuple(specs))
    store.write_record(_manifest_name(store, round_id), manifest)


def read_manifest(store: Store, round_id: int) -> ModelManifest:
    manifest = store.read_record(_manifest_name(store, round_id), ModelManifest.from_json)
    if manifest is None:
        raise NotFound(f"no global model for round {round_id}")
    return manifest


def read_counters(store: Store) -> Counters:
    return store.read_record("counters.json", Counters.from_json) or Counters()


def _open_round(store: Store, config: FederationConfig, round_id: int, *, now: float) -> None:
    store.write_record("state.json", RoundState(round_id, OPEN, now, now + config.round_timeout_s))


# ---------------------------------------------------------------------------------------------
# reads


def read_state(store: Store) -> RoundState:
    state = store.read_record("state.json", RoundState.from_json)
    if state is None:
        raise StoreError(f"store {store.root} is not initialised")
    return state


def current_round(store: Store, config: FederationConfig) -> RoundView:
    state = read_state(store)
    round_id = state.round_id
    # Once finished, the digest is that of the final model (written by the last round's close).
    digest = read_manifest(store, round_id + 1 if state.finished else round_id).digest
    return RoundView(
        round_id=round_id,
        state=state.state,
        deadline=state.deadline,
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
    sites = (store.read_record("sites.json", _site_list) or [])
    if site not in sites:
        store.write_json("sites.json", sorted({*sites, site}))
    return current_round(store, config)


def model_for_download(store: Store, round_id: int) -> tuple[int, Path, str]:
    """The model file a download of ``round_id`` streams (0: the current round, or the final model)."""
    state = read_state(store)
    if round_id == 0:
        round_id = state.round_id + (1 if state.finished else 0)
    path = store.model_path(round_id)
    if not path.exists():
        raise NotFound(
            f"no global model for round {round_id}; the current round is {state.round_id} ({state.state})"
        )
    return round_id, path, read_manifest(store, round_id).digest


def iter_model_frames(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from codec.read_frames(fh)


def record_bytes_out(store: Store, nbytes: int) -> None:
    counters = read_counters(store)
    store.write_record("counters.json", replace(counters, bytes_out=counters.bytes_out + int(nbytes)))


def record_rejection(store: Store, reason: str) -> None:
    counters = read_counters(store)
    rejections = {**counters.rejections, reason: counters.rejections.get(reason, 0) + 1}
    store.write_record("counters.json", replace(counters, rejections=rejections))


def status(store: Store, config: FederationConfig) -> dict[str, Any]:
    view = current_round(store, config)
    counters = read_counters(store).to_json()
    completed = view.round_id if view.state == FINISHED else view.round_id - 1
    return {
        "federation_id": config.federation_id,
        "round": view,
        "rounds_completed": completed,
        "sites_seen": (store.read_record("sites.json", _site_list) or []),
        "strategy": config.strategy,
        **counters,
    }


def round_metrics(store: Store, config: FederationConfig, round_id: int) -> dict[str, Any]:
    """Per-site metrics, weights and the aggregate of a round (0: the last closed round)."""
    state = read_state(store)
    current = state.round_id
    if round_id == 0:
        round_id = current if state.finished else current - 1
        if round_id < 1:
            raise NotFound("no round has closed yet; round 1 is open")
    if round_id > current or round_id < 1:
        raise NotFound(f"round {round_id} does not exist; the current round is {current}")
    result = store.read_record(store.result_path(round_id).relative_to(store.root), RoundResult.from_json)
    submissions, _ = stored_submissions(store, round_id)
    sites = []
    for record in submissions:
        part = result.sites.get(record.site, {}) if result is not None else {}
        sites.append({**record.to_json(), "weight": part.get("weight", 0.0), "weight_factors": part.get("factors", {})})
    return {
        "round_id": round_id,
        "closed": result is not None,
        "sites": sites,
        "aggregate": _aggregate_metrics(sites),
        "aggregate_extra": _aggregate_extra(sites),
        "aggregate_cases": sum(int(s.get("extra_metrics", {}).get("validation_cases", 0)) for s in sites),
        "result": result.to_json() if result is not None else None,
    }


def stored_submissions(store: Store, round_id: int) -> tuple[list[Submission], dict[str, str]]:
    """The round's committed submissions in site-name order, and those that cannot be used.

    A record that is not valid JSON, not a submission's shape, or for another site or round was
    damaged after it was committed (uploads are fully checked first): it is left out with its
    reason, so stored data can never make a round unclosable or its metrics unreadable.
    """
    usable: list[Submission] = []
    excluded: dict[str, str] = {}
    for site in store.committed_sites(round_id):
        try:
            record = store.read_record(store.submission_paths(round_id, site)[1].relative_to(store.root),
                                       Submission.from_json)
            if record is None:  # removed since it was listed
                continue
            if (record.site, record.round_id) != (site, round_id):
                raise StoreError(f"the record names site {record.site!r} round {record.round_id}")
            site_stats(record)  # the ranges strategies rely on (e.g. Dice in [0, 1])
        except (StoreError, ValueError) as exc:
            excluded[site] = str(exc)
            log.error("round %d: %s's stored submission is left out: %s", round_id, site, exc)
            continue
        usable.append(record)
    return usable, excluded


def _aggregate_metrics(sites: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Sample-weighted mean of the sites' local metrics (finite values only)."""
    return _weighted_means(sites, "metrics", METRIC_NAMES)


def _aggregate_extra(sites: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Sample-weighted mean of each extra metric, over the sites that report it (finite values only);
    ``validation_cases`` is summed instead (see :func:`round_metrics`)."""
    names = sorted({name for s in sites for name in s.get("extra_metrics", {})} - {"validation_cases"})
    return _weighted_means(sites, "extra_metrics", names)


def _weighted_means(sites: Sequence[Mapping[str, Any]], key: str, names: Sequence[str]) -> dict[str, float]:
    """For each name, the sample-weighted mean of ``site[key][name]`` over the sites whose value is finite."""
    out: dict[str, float] = {}
    for name in names:
        pairs = [(s["sample_count"], s[key][name]) for s in sites if name in s.get(key, {})]
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

    frames: codec.DigestingFrames = field(default_factory=codec.DigestingFrames)
    nbytes: int = 0
    commit: UpdateCommit | None = None

    @property
    def chunks(self) -> int:
        return self.frames.count


def check_header(store: Store, config: FederationConfig, header: UpdateHeader) -> ModelManifest:
    """Refuse an upload early, before any frame is read. Returns the round's model manifest."""
    check_site_name(header.site)
    if config.sites and header.site not in config.sites:
        raise UnknownSite(f"site {header.site!r} is not in this federation")
    state = read_state(store)
    closed = state.finished or header.round_id != state.round_id
    if closed and store.read_submission(header.round_id, header.site) is not None:
        # Maybe a retry of the upload that closed the round, sent by a site that lost its receipt:
        # spooled like any upload, and answered as a duplicate only if its digest is the committed one.
        return read_manifest(store, header.round_id)
    if state.finished:
        raise WrongRound(f"the federation finished after round {state.round_id}; no update is accepted")
    if closed:
        raise WrongRound(
            f"update for round {header.round_id} refused: the current round is {state.round_id}"
        )
    check_header_values(header)
    return read_manifest(store, header.round_id)


def check_header_values(header: UpdateHeader) -> None:
    """Refuse any value of a header outside its documented range (``protos/.../local_metrics.py``).

    Every value a site sends is checked here, before anything is stored: a value no strategy can
    use (a Dice of 1.5, an HD95 of -1) or no response can carry (``validation_cases`` = 1e30)
    must never reach the store, where it would break every later read of the round.

    Raises:
        InvalidUpdate: naming the field, its value and the allowed range (reason ``bad_header``).
    """
    def refuse(message: str) -> InvalidUpdate:
        return InvalidUpdate(f"UpdateHeader: {message}", reason="bad_header")

    if not 1 <= header.sample_count <= MAX_SAMPLE_COUNT:
        raise refuse(f"sample_count must be in [1, {MAX_SAMPLE_COUNT}], got {header.sample_count}")
    if not 0 <= header.bytes_downloaded < 2**53:
        raise refuse(f"bytes_downloaded must be in [0, 2^53), got {header.bytes_downloaded}")
    for name, value in header.metrics.items():
        if name not in METRIC_RANGES:
            raise refuse(f"metrics.{name} is not a LocalMetrics field; allowed: {list(METRIC_RANGES)}")
        problem = check_metric(name, value)
        if problem:
            raise refuse(f"metrics.{problem}")
    extra = dict(header.extra_metrics)
    cases = extra.pop("validation_cases", 0.0)
    if not (math.isfinite(cases) and cases == int(cases) and 0 <= cases <= MAX_VALIDATION_CASES):
        raise refuse(f"metrics.validation_cases must be a whole number in [0, {MAX_VALIDATION_CASES}], got {cases!r}")
    if len(extra) > MAX_EXTRA_METRICS:
        raise refuse(f"metrics.extra holds {len(extra)} entries, at most {MAX_EXTRA_METRICS} are accepted")
    low, high = EXTRA_METRIC_RANGE
    for name, value in extra.items():
        if not 0 < len(name) <= MAX_EXTRA_NAME_CHARS:
            raise refuse(f"metrics.extra name {name[:80]!r} must be 1-{MAX_EXTRA_NAME_CHARS} characters long")
        if not (math.isfinite(value) and low <= value <= high):
            raise refuse(f"metrics.extra[{name!r}] must be finite and in [{low:g}, {high:g}], got {value!r}")


def max_update_bytes(config: FederationConfig, manifest: ModelManifest) -> int:
    """The configured limit, or by default twice the dense fp32 model plus framing slack."""
    if config.max_update_bytes:
        return config.max_update_bytes
    dense = sum(4 * math.prod(t.shape) for t in manifest.tensors)
    return 2 * dense + (1 << 20)


def _checked_frames(
    parts: Iterable[bytes | UpdateCommit], manifest: ModelManifest, limit: int, upload: _Upload
) -> Iterator[bytes]:
    """Pass frames through while checking them against the global model's tensors, in order."""
    tensors = [t.to_json() for t in manifest.tensors]
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
            if any(t["name"] == header.name for t in tensors[: index + 1]):
                raise InvalidUpdate(
                    f"tensor {header.name!r} is sent twice (frame {upload.chunks}); each model tensor is sent once",
                    reason="duplicate_tensor",
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
        upload.frames.update(item)
        yield item
    raise InvalidUpdate("the upload stream ended without its commit message", reason="incomplete_stream")


def _verify_update(path: Path, manifest: ModelManifest) -> float:
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
    if len(summary) != len(manifest.tensors):
        raise InvalidUpdate(
            f"update holds {len(summary)} tensors, the model has {len(manifest.tensors)}", reason="tensor_mismatch"
        )
    return math.sqrt(total)


def spool_update(
    store: Store,
    config: FederationConfig,
    header: UpdateHeader,
    parts: Iterable[bytes | UpdateCommit],
) -> tuple[Path, Submission]:
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
        digest = upload.frames.hexdigest()
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
    record = Submission(
        site=header.site,
        round_id=header.round_id,
        sample_count=header.sample_count,
        metrics=dict(header.metrics),
        extra_metrics=dict(header.extra_metrics),
        codec=dict(header.codec),
        bytes_downloaded=header.bytes_downloaded,
        digest=digest,
        bytes=upload.nbytes,
        chunks=upload.chunks,
        update_norm=norm,
    )
    return spool, record


def commit_update(
    store: Store, config: FederationConfig, spool: Path, record: Submission, *, now: float
) -> Receipt:
    """Make a verified upload part of its round (call under the aggregator's lock)."""
    round_id = record.round_id
    site = record.site
    try:
        state = read_state(store)
        existing = store.read_record(store.submission_paths(round_id, site)[1].relative_to(store.root),
                                     Submission.from_json)
        if existing is not None and existing.digest == record.digest:
            # A retry of a committed upload gets its receipt, also after that commit closed the round.
            spool.unlink(missing_ok=True)
            return Receipt(round_id, existing.digest, existing.bytes, True, len(store.committed_sites(round_id)))
        if state.finished or state.round_id != round_id:
            why = (
                f"it is not the update {site!r} committed (digest {existing.digest[:16]}…)"
                if existing is not None else "the round closed while the update was uploading"
            )
            raise WrongRound(
                f"update for round {round_id} refused: {why}; the current round is "
                f"{state.round_id} ({state.state})"
            )
        if existing is not None:
            if existing.digest != record.digest:
                raise ConflictingSubmission(
                    f"site {site!r} already submitted a different update for round {round_id} "
                    f"(digest {existing.digest[:16]}…)"
                )
            spool.unlink(missing_ok=True)
            return Receipt(round_id, existing.digest, existing.bytes, True, len(store.committed_sites(round_id)))
        store.commit_submission(spool, round_id, site, replace(record, committed_at=now))
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    # Committed: from here on the client must hear so, whatever else fails. The counters are
    # statistics; a full disk or a damaged counters file costs a count, not the site's update.
    try:
        counters = read_counters(store)
        store.write_record("counters.json", replace(
            counters, bytes_in=counters.bytes_in + record.bytes, submissions_total=counters.submissions_total + 1
        ))
    except (OSError, StoreError) as exc:
        log.error("round %d: %s's update is committed, but the counters could not be updated (%s)",
                  round_id, site, exc)
    return Receipt(round_id, record.digest, record.bytes, False, len(store.committed_sites(round_id)))


# ---------------------------------------------------------------------------------------------
# closing a round


def site_stats(record: Submission) -> SiteStats:
    """A strategy's view of one committed submission (its record in the store).

    Raises:
        ValueError: a value outside the range the strategies rely on (named).
    """
    return SiteStats(
        site=record.site,
        sample_count=record.sample_count,
        dice=record.metrics.get("dice"),
        hd95=record.metrics.get("hd95"),
        update_norm=record.update_norm,
        finite=True,  # non-finite updates are refused at submission
    )


def due_to_close(store: Store, config: FederationConfig, *, now: float) -> bool:
    state = read_state(store)
    if state.finished:
        return False
    count = len(store.committed_sites(state.round_id))
    return count >= config.max_clients or (now >= state.deadline and count >= config.min_clients)


class _SiteDamaged(StoreError):
    """One site's stored update cannot be read back: the round closes without it."""

    def __init__(self, site: str, message: str) -> None:
        super().__init__(message)
        self.site = site


class _SiteReader:
    """One site's committed update, read tensor by tensor while its round closes.

    Between tensors it holds only the open file (and its 8 KiB read buffer): frames are read, decoded
    and added one at a time, and nothing decoded outlives its part. Closing a round with K sites
    thus keeps K small buffers, not K decoded frames.
    """

    def __init__(self, site: str, path: Path, round_id: int) -> None:
        self.site = site
        self.round_id = round_id
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 - open across calls; closed by close()
        except OSError as exc:
            raise self._corrupt(f"its frames cannot be opened ({exc})") from None
        self._frames = codec.read_frames(self._fh)

    def close(self) -> None:
        self._fh.close()

    def _corrupt(self, message: str) -> _SiteDamaged:
        # Uploads are fully checked when spooled: a mismatch here means the store was damaged.
        return _SiteDamaged(self.site, f"round {self.round_id}: {self.site}'s stored update is damaged: {message}")

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
        self.dense_into(out)
        return out

    def dense_into(self, out: np.ndarray) -> None:
        """Write Δ into ``out`` (the tensor's shape; zeros where nothing was sent), with no copy."""
        if out.shape != self._spec.shape:
            raise ValueError(f"out must have shape {self._spec.shape}, got {out.shape}")
        out.fill(0)
        for part in self._parts():
            part.write_to(out)

    def finish(self) -> None:
        if not self._read:
            self._read = True
            self._reader.skip(self._spec)


def _write_model(path: Path, tensors: Iterable[tuple[str, np.ndarray]]) -> tuple[list[TensorSpec], str]:
    """Write a global model file atomically; return its tensors and the SHA-256 of its frames."""
    specs: list[TensorSpec] = []

    def described() -> Iterator[tuple[str, np.ndarray]]:
        for name, array in tensors:
            specs.append(TensorSpec(name, tuple(array.shape), array.dtype.str))
            yield name, array

    # codec.LOSSLESS, not a faster spec: sites (and delta downloads) re-encode a model with it and
    # must get the same bytes, hence the same digest.
    frames = codec.DigestingFrames(codec.encode_tensors(described(), codec.LOSSLESS))
    with codec.atomic_writer(path) as fh:
        codec.write_frames(fh, frames)
    return specs, frames.hexdigest()


class _Unpublishable(Exception):
    """The aggregate cannot become the next global model (the message says why)."""


def _finite_tensors(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Pass tensors through, refusing the first one with NaN or Inf (a poisoned or overflowed aggregate)."""
    for name, array in tensors:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise _Unpublishable(f"the aggregate of tensor {name!r} has {bad} NaN or Inf value(s)")
        yield name, array


def _aggregate_into(
    store: Store, strategy: Any, round_id: int, records: Sequence[Submission], weights: np.ndarray,
    state_in: Any, dst: Path,
) -> tuple[list[TensorSpec], str]:
    """Stream the new global model of ``round_id`` into ``dst`` (atomically); its tensors and digest.

    Raises:
        _SiteDamaged: a site's stored frames are damaged (that site can be left out).
        _Unpublishable: the aggregate is not finite; nothing is written.
    """
    src = store.model_path(round_id)

    def new_tensors() -> Generator[tuple[str, np.ndarray], None, None]:
        readers: list[_SiteReader] = []
        # One decompressor for every site: frames are decoded one at a time.
        decompressor = zstandard.ZstdDecompressor()
        try:
            for record in records:
                readers.append(_SiteReader(record.site, store.submission_paths(round_id, record.site)[0], round_id))
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
        return _write_model(dst, _finite_tensors(tensors))
    finally:
        tensors.close()  # closes the sites' files now, also when writing failed


def close_round(
    store: Store, config: FederationConfig, *, now: float, clock: Callable[[], float] = time.monotonic
) -> dict[str, Any]:
    """Aggregate the open round's submissions into the next global model and open the next round.

    Deterministic in what the store holds: sites are taken in name order, every tensor is
    accumulated in that order (see ``strategies.Strategy.apply``), and the model is written
    losslessly. Tensor by tensor, every site's frames of the tensor are read, decoded and added
    one frame at a time, so memory is a few copies of the largest tensor plus one small read
    buffer per site (times the number of sites for median and trimmed mean only, which need every
    site's dense values of a tensor at once).

    Stored data never keeps a round from closing: a submission whose record or frames are damaged
    is left out (``excluded`` in the result says why), and an aggregate that cannot be published
    (not finite, or no weights can be given) closes the round with its model unchanged
    (``published: false`` and ``refused`` say why) — a deterministic outcome, like any other.
    """
    started = clock()
    state = read_state(store)
    round_id = state.round_id
    records, excluded = stored_submissions(store, round_id)
    if not records and not excluded:
        raise WrongRound(f"round {round_id} has no submissions to aggregate")
    strategy = config.aggregation
    dst = store.model_path(round_id + 1)
    refused = ""
    weights: np.ndarray = np.zeros(0)
    factors: list[dict[str, float]] = []
    state_in: Any = None
    while True:
        if not records:
            refused = "no submission of this round can be aggregated"
            break
        try:
            weights, factors = strategy.weights([site_stats(r) for r in records])
            state_in = strategy.load_state(store.model_path(round_id))
            specs, digest = _aggregate_into(store, strategy, round_id, records, weights, state_in, dst)
            break
        except _SiteDamaged as exc:
            excluded[exc.site] = str(exc)
            log.error("round %d: leaving out %s: %s", round_id, exc.site, exc)
            records = [r for r in records if r.site != exc.site]
        except (_Unpublishable, ValueError, FloatingPointError) as exc:
            # ValueError: the strategy cannot weigh these sites (e.g. AAM's cap with too few usable ones).
            refused = str(exc)
            break
    published = not refused
    if published:
        strategy.save_state(dst, state_in)
    else:
        log.error("round %d: the aggregate is not published (%s); round %d keeps the current model",
                  round_id, refused, round_id + 1)
        # The next round trains from the same model: copy it (same bytes, same digest).
        manifest = read_manifest(store, round_id)
        with codec.atomic_writer(dst) as out, open(store.model_path(round_id), "rb") as src_fh:
            while block := src_fh.read(1 << 20):
                out.write(block)
        specs, digest = list(manifest.tensors), manifest.digest
        weights = np.zeros(len(records))
        factors = [{} for _ in records]
    _write_manifest(store, round_id + 1, specs, digest)
    result = RoundResult(
        round_id=round_id,
        strategy=config.strategy,
        sites={r.site: {"weight": float(w), "factors": f} for r, w, f in zip(records, weights, factors)},
        global_model_digest=digest,
        closed_at=now,
        close_seconds=clock() - started,
        excluded=excluded,
        published=published,
        refused=refused,
    )
    store.write_record(store.result_path(round_id).relative_to(store.root), result)
    if round_id >= config.rounds:
        store.write_record("state.json", replace(state, state=FINISHED))
    else:
        _open_round(store, config, round_id + 1, now=now)
    log.info(
        "round %d closed: %d site(s), weights %s, model %s… (%.2fs)",
        round_id, len(records), {r.site: round(float(w), 4) for r, w in zip(records, weights)}, digest[:12],
        result.close_seconds,
    )
    return result.to_json()
