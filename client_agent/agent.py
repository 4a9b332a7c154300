"""The site's lifecycle: join → wait for an open round → download → train → validate → encode → upload.

:meth:`SiteAgent.run` loops until the federation is over (or a stop is requested). Every step that
must survive a restart writes to the site's state directory first (``state.py``): the downloaded
global model, the encoded update and its new residual before the upload, the receipt after it.
A restarted agent therefore

* resends exactly the same bytes for a round whose upload was interrupted (same digest: the
  aggregator counts it once, and answers a second commit as a duplicate);
* settles an update it encoded for a round that closed while it was down: if the round's
  metrics list the site, the update was committed and its residual comes into force; otherwise
  the update is dropped and the previous residual stays;
* never trains or submits a round twice, and keeps its error-feedback residual intact.

Each download names the newest global model the site holds (:meth:`SiteAgent.held_model`), so the
aggregator may send a lossless delta from it instead of the whole model; the rebuilt model is
checked against the full model's digest before it is trained from, and any failure falls back to
the full download (``client_agent.transport``).

Bad data is refused before the aggregator is contacted (:func:`check_data`), and again after
``Join`` against the federation's model (:meth:`SiteAgent.check_federation`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

import codec
from client_agent.data import (
    AUGMENTATIONS,
    AugmentConfig,
    DataError,
    Problem,
    SiteData,
    augmentation_recipe,
    build_datasets,
    discover_cases,
    make_loader,
    resolve_label_map,
    validate_cases,
)
from client_agent import feedback
from client_agent.privacy import DEFAULT_DELTA, PrivacyLedger, clip_and_noise
from client_agent.reporting import Reporter
from client_agent.state import SiteState
from client_agent.training import (
    LoopSettings,
    TrainingError,
    evaluate,
    pick_device,
    seed_everything,
    train_local,
)
from client_agent.transport import AggregatorClient, HeldModel, Refused
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1.local_metrics import LOCAL_METRIC_NAMES, SEGMENTATION_METRIC_NAMES

log = logging.getLogger("client_agent")

__all__ = [
    "AgentSettings",
    "DataCheck",
    "RoundOutcome",
    "SiteAgent",
    "UpdateTransform",
    "check_data",
    "load_arrays",
    "model_from_config",
    "named_arrays",
    "update_header",
]

METRICS = SEGMENTATION_METRIC_NAMES
# Label values are checked against this bound when the federation's class count is not known yet:
# the check then still finds unreadable files, shape mismatches and non-integer labels.
_ANY_CLASS_COUNT = 2**31

# A change applied to a round's update before encoding: name -> array in, name -> array out.
UpdateTransform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class AgentSettings:
    """What a site configures (``client-agent --help`` documents each)."""

    data: Path
    aggregator: str
    site: str
    state_dir: Path
    cache_dir: Path | None = None
    device: str = "auto"
    amp: bool = True
    val_fraction: float = 0.2
    augment: bool = True
    label_map: str | Mapping[Any, Any] | None = None
    on_bad_file: str = "skip"
    num_workers: int = 0
    num_classes: int | None = None  # checked before contacting the aggregator, and against the federation
    poll_initial_s: float = 0.5
    poll_max_s: float = 10.0
    max_rounds: int = 0  # 0: until the federation finishes
    seed: int | None = None  # None: the federation's seed
    dp_clip_norm: float = 0.0  # > 0: clip each update to this L2 norm (client-side DP)
    dp_noise_multiplier: float = 0.0  # Gaussian noise std = multiplier x clip norm
    dp_delta: float = DEFAULT_DELTA  # the delta of the (epsilon, delta) reported with every update
    dp_epsilon_budget: float = 0.0  # > 0: stop contributing before epsilon would exceed this
    gpus: int = 1  # > 1: train each round with DistributedDataParallel, one process per GPU

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.on_bad_file not in ("skip", "fail"):
            raise ValueError(f"on_bad_file must be 'skip' or 'fail', got {self.on_bad_file!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one class), got {self.num_classes}")
        if self.dp_clip_norm < 0 or self.dp_noise_multiplier < 0:
            raise ValueError("dp_clip_norm and dp_noise_multiplier must be >= 0")
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm == 0:
            raise ValueError("dp_noise_multiplier needs dp_clip_norm > 0: noise is calibrated to the clip norm")
        if self.dp_epsilon_budget < 0:
            raise ValueError(f"dp_epsilon_budget must be >= 0 (0: none), got {self.dp_epsilon_budget}")
        if self.dp_epsilon_budget > 0 and self.dp_noise_multiplier == 0:
            raise ValueError("dp_epsilon_budget needs dp_noise_multiplier > 0: without noise epsilon is infinite")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {self.gpus}")
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0 (0: until the federation finishes), got {self.max_rounds}")
        if not 0 < self.poll_initial_s <= self.poll_max_s:
            raise ValueError(
                f"poll intervals must satisfy 0 < poll_initial_s <= poll_max_s, got {self.poll_initial_s}, {self.poll_max_s}"
            )


@dataclass
class RoundOutcome:
    """What one round did, for the summary line (``Reporter.round_summary``)."""

    round_id: int
    submitted: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    dense_bytes: int = 0
    seconds: float = 0.0
    resumed: bool = False  # the update was encoded before a restart and only (re)sent now
    duplicate: bool = False  # the aggregator already had it (a retried or resumed upload)


@dataclass(frozen=True)
class DataCheck:
    """The result of :func:`check_data`: what the site folder holds."""

    folder: Path
    cases: int
    usable: int
    problems: tuple[Problem, ...]
    num_classes: int | None  # the class count labels were checked against; None: not checked yet


def check_data(settings: AgentSettings) -> DataCheck:
    """Check the site's folder before contacting the aggregator: fail fast, name what is wrong.

    Finds the cases (:func:`client_agent.data.discover_cases`: a missing or empty folder, no
    labels, an unknown layout) and reads every label and image header
    (:func:`client_agent.data.validate_cases`: unreadable or missing files, shape and affine
    mismatches, non-integer labels, and — with ``settings.num_classes`` — label values outside
    ``[0, num_classes)``). With ``on_bad_file="skip"`` bad cases are skipped with a warning and
    only a folder without a single usable case fails; with ``"fail"`` any problem fails.

    Raises:
        DataError: naming the folder or file and what was expected.
    """
    cases = discover_cases(settings.data)
    mapping = resolve_label_map(settings.label_map)
    good, problems = validate_cases(
        cases,
        num_classes=settings.num_classes or _ANY_CLASS_COUNT,
        label_map=mapping,
        on_error=settings.on_bad_file,  # type: ignore[arg-type]
    )
    if not good:
        listing = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"no usable case in {settings.data}: {listing}{more}")
    return DataCheck(settings.data, len(cases), len(good), tuple(problems), settings.num_classes)


def model_from_config(config: pb.TrainingConfig) -> torch.nn.Module:
    """The federation's network, built from the round's ``ModelSpec``."""
    from model import build_model

    spec = config.model
    options = json.loads(spec.options_json) if spec.options_json else {}
    return build_model(
        spec.architecture,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        img_size=tuple(spec.img_size),
        **options,
    )


def named_arrays(model: torch.nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """The model's state dict as (name, numpy array) in state-dict order."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach().cpu().numpy()


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named numpy arrays into ``model``; both must hold exactly the same tensor names."""
    state = model.state_dict()
    missing = set(state) ^ set(arrays)
    if missing:
        raise ValueError(f"global model and local network disagree on tensors: {sorted(missing)[:5]}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in state})


def update_header(site: str, round_id: int, pending: Mapping[str, Any]) -> pb.UpdateHeader:
    """The upload's header, from the pending record written when the update was encoded."""
    return pb.UpdateHeader(
        site=site,
        round_id=round_id,
        sample_count=pending["sample_count"],
        metrics=pb.LocalMetrics(
            **{k: pending["metrics"][k] for k in LOCAL_METRIC_NAMES},
            validation_cases=pending["validation_cases"],
            extra=pending["extra"],
        ),
        codec=pb.CodecSpec(**codec.CodecSpec(**pending["codec"]).to_fields()),
        bytes_downloaded=pending["bytes_downloaded"],
    )


def _round_metrics(scores: Mapping[str, Any], trained: Any) -> dict[str, float]:
    """The update header's metrics: local validation scores, the training loss and time."""
    metrics = {k: float(scores[k]) for k in METRICS}
    metrics["train_loss"] = float(trained.final_loss)
    metrics["train_seconds"] = float(trained.seconds)
    return metrics


def _per_class_dice(scores: Mapping[str, Any]) -> dict[str, float]:
    # The aggregator refuses a header with a non-finite metric; an undefined per-class
    # extra is left out rather than costing the whole update.
    return {
        f"dice/{c}": float(v["dice"])
        for c, v in scores.get("per_class", {}).items()
        if math.isfinite(float(v["dice"]))
    }


class SiteAgent:
    """One site's agent. The loop is :meth:`run`; :meth:`run_round` does one round, which is
    :meth:`prepare_update` (download, train, validate, encode; all persisted) then :meth:`upload`."""

    def __init__(
        self, settings: AgentSettings, client: AggregatorClient, reporter: Reporter, *,
        transform_update: UpdateTransform | None = None,
    ) -> None:
        """``transform_update``: applied to each round's update (name -> θ_local − θ_global, after
        any clipping and noise) just before it is encoded; the residual is not transformed. The
        agent never sets it; a simulation's misbehaving site does (``experiments/faulty_agent.py``)."""
        self.settings = settings
        self.transform_update = transform_update
        self.client = client
        self.reporter = reporter
        self.state = SiteState(settings.state_dir)
        self.device = pick_device(settings.device)
        self._data: SiteData | None = None
        self._data_key: tuple[Any, ...] = ()

    # -- data --------------------------------------------------------------------------------
    def site_data(self, config: pb.TrainingConfig) -> SiteData:
        """The site's datasets for the federation's model (built once per model geometry)."""
        augment = self._augmentation(config)
        patch = tuple(config.model.patch_size)
        key = (tuple(config.model.img_size), config.model.out_channels, config.seed, config.model.spacing_mm, augment,
               patch)
        if self._data is None or key != self._data_key:
            data = build_datasets(
                self.settings.data,
                spatial_size=tuple(config.model.img_size),
                spacing_mm=float(config.model.spacing_mm),  # the federation's voxel spacing; 0: resize
                num_classes=config.model.out_channels,
                label_map=self.settings.label_map,
                val_fraction=self.settings.val_fraction,
                seed=self._seed(config),
                augment=augment or False,
                cache_dir=self.settings.cache_dir,
                on_error=self.settings.on_bad_file,  # type: ignore[arg-type]
                patch_size=patch or None,  # the federation's training window; empty: whole volumes
            )
            if data.in_channels != config.model.in_channels:
                raise DataError(
                    f"{self.settings.data}: images have {data.in_channels} channel(s), the federation's "
                    f"model takes {config.model.in_channels}"
                )
            self._data, self._data_key = data, key
        return self._data

    def _augmentation(self, config: pb.TrainingConfig) -> AugmentConfig | None:
        """The recipe the federation names (``TrainingConfig.augmentation``), or none when this site turned it off."""
        if not self.settings.augment:
            return None
        try:
            return augmentation_recipe(config.augmentation or "standard")
        except ValueError:
            # The name comes from the aggregator: an agent that does not know it skips the round with this reason.
            raise TrainingError(f"unknown augmentation {config.augmentation!r}; this site runs {list(AUGMENTATIONS)} "
                                f"(upgrade the client agent?)") from None

    def check_federation(self, config: pb.TrainingConfig) -> SiteData:
        """After ``Join``: the site's data must fit the federation's model (classes, channels).

        Raises:
            DataError: ``--num-classes`` differs from the model's classes, labels hold classes the
                model does not predict, or images have another number of channels.
        """
        classes = config.model.out_channels
        if self.settings.num_classes is not None and self.settings.num_classes != classes:
            raise DataError(
                f"--num-classes is {self.settings.num_classes} but the federation's model predicts {classes} "
                f"classes (background included); fix --num-classes or the label map of {self.settings.data}"
            )
        return self.site_data(config)

    def _seed(self, config: pb.TrainingConfig) -> int:
        return config.seed if self.settings.seed is None else self.settings.seed

    # -- the loop ----------------------------------------------------------------------------
    def run(self, *, stop: threading.Event | None = None) -> int:
        """Take part in rounds until the federation finishes, ``max_rounds`` are done, or ``stop``.

        Returns 0. Raises :class:`DataError` when the data does not fit the federation and
        :class:`Refused` when the aggregator refuses this site (unknown site, revoked, …).
        """
        stop = stop or threading.Event()
        self.check_privacy_budget(0)  # a site whose budget is already spent does not even join
        joined = self.client.join(self.settings.site)
        doc = self.state.load()
        if doc.get("federation_id") not in (None, joined.federation_id):
            raise DataError(
                f"state directory {self.settings.state_dir} belongs to federation {doc['federation_id']!r}, "
                f"not {joined.federation_id!r}; use another --state-dir"
            )
        self.state.save({**doc, "site": self.settings.site, "federation_id": joined.federation_id})
        self.reporter.event("joined", site=self.settings.site, federation=joined.federation_id,
                            round=joined.round.round_id)
        if joined.round.state != pb.ROUND_STATE_FINISHED:
            data = self.check_federation(joined.round.config)
            self.reporter.event("datasets", train=len(data.train), validation=len(data.val),
                                skipped=len(data.problems), classes=data.num_classes)
        rounds_done = 0
        delay = self.settings.poll_initial_s
        while not stop.is_set():
            current = self.client.get_round(self.settings.site)
            self.settle_stale(current)
            if current.state == pb.ROUND_STATE_FINISHED:
                self.reporter.event("finished", rounds=current.total_rounds, site=self.settings.site)
                return 0
            if current.state == pb.ROUND_STATE_OPEN and not self.state.is_done(current.round_id):
                outcome = self.run_round(current)
                self.reporter.round_summary(outcome)
                rounds_done += 1
                delay = self.settings.poll_initial_s
                if self.settings.max_rounds and rounds_done >= self.settings.max_rounds:
                    return 0
                continue
            stop.wait(delay)
            delay = min(self.settings.poll_max_s, delay * 1.5)
        self.reporter.event("stopped", site=self.settings.site, rounds=rounds_done)
        return 0

    def settle_stale(self, current: pb.Round) -> None:
        """Resolve updates encoded for rounds that can no longer accept them (closed while down).

        The round's metrics say whether the aggregator committed this site's update before the
        round closed: a site has at most one submission per round, and this agent only ever
        sends its pending update, so a listed site means the pending update was applied and its
        residual must come into force. Otherwise it was never applied: drop it, keep the old
        residual.
        """
        for r in self.state.pending_rounds():
            stale = r < current.round_id or (r == current.round_id and current.state == pb.ROUND_STATE_FINISHED)
            if not stale or self.state.is_done(r):
                continue
            pending = self.state.pending(r) or {}
            try:
                sites = {s.site: s for s in self.client.round_metrics(r).sites}
            except Refused as exc:
                log.warning("round %d: cannot learn whether its update was committed (%s); dropping it", r, exc)
                sites = {}
            mine = sites.get(self.settings.site)
            if mine is not None and pending.get("digest"):
                self.state.finish_round(r, receipt={"digest": pending["digest"], "bytes": mine.bytes_uploaded,
                                                    "duplicate": True, "confirmed_by": "round_metrics"})
                self.reporter.event("settled", round=r, committed=True)
            else:
                self.state.finish_round(r, receipt=None, refusal=f"round {r} closed before its update was committed")
                self.reporter.event("settled", round=r, committed=False)

    def run_round(self, round_: pb.Round) -> RoundOutcome:
        """One round: reuse the pending update of an interrupted run, or prepare one; upload it."""
        r = round_.round_id
        started = time.monotonic()
        pending = self.state.pending(r)
        resumed = pending is not None
        if pending is None:
            try:
                pending = self.prepare_update(round_)
            except TrainingError as exc:
                # The same model, data and seed would fail the same way: skip the round, go on.
                log.error("round %d: local training failed, nothing is sent: %s", r, exc)
                self.state.finish_round(r, receipt=None, refusal=f"local training failed: {exc}")
                return RoundOutcome(r, False, reason=f"local training failed: {exc}", seconds=time.monotonic() - started)
        else:
            self.reporter.event("resume", round=r, digest=pending["digest"][:16])
        outcome = self.upload(r, pending)
        outcome.resumed = resumed
        outcome.seconds = time.monotonic() - started
        return outcome

    def upload(self, round_id: int, pending: Mapping[str, Any]) -> RoundOutcome:
        """Send the stored update of ``round_id`` and record the receipt (or the refusal)."""
        r = round_id
        outcome = RoundOutcome(
            r, False, metrics=dict(pending["metrics"]), bytes_down=pending["bytes_downloaded"],
            dense_bytes=pending["dense_bytes"],
        )
        header = update_header(self.settings.site, r, pending)
        try:
            receipt = self.client.submit(header, self.state.path("pending", r), pending["digest"], pending["chunks"])
        except Refused as exc:
            # The aggregator's answer is final for this round: log it and go on with the next.
            log.warning("round %d: update refused by the aggregator: %s", r, exc)
            self.state.finish_round(r, receipt=None, refusal=str(exc))
            outcome.reason = str(exc)
            return outcome
        self.state.finish_round(
            r, receipt={"digest": receipt.digest, "bytes": receipt.bytes_received, "duplicate": receipt.duplicate}
        )
        outcome.submitted = True
        outcome.duplicate = receipt.duplicate
        outcome.bytes_up = receipt.bytes_received
        return outcome

    def held_model(self, round_id: int) -> HeldModel | None:
        """The newest global model this site holds from before ``round_id``: the base of a delta.

        Its digest is computed from the file, so a model damaged on disk names itself: the
        aggregator, which knows the round's true digest, then sends the full model. An unreadable
        file is no base at all.
        """
        latest = self.state.latest_global(round_id)
        if latest is None:
            return None
        held_round, path = latest
        try:
            digest = self.state.frames_digest("global", held_round)
        except (OSError, codec.CodecError) as exc:
            log.warning("round %d's global model in %s is unreadable (%s); downloading in full",
                        held_round, self.settings.state_dir, exc)
            return None
        return HeldModel(held_round, path, digest)

    @property
    def privacy(self) -> PrivacyLedger | None:
        """The site's privacy ledger when it adds noise (ε is only defined then)."""
        if self.settings.dp_noise_multiplier <= 0:
            return None
        return PrivacyLedger(self.settings.state_dir / "privacy.json", delta=self.settings.dp_delta,
                             budget=self.settings.dp_epsilon_budget)

    def check_privacy_budget(self, round_id: int) -> None:
        """Raise :class:`PrivacyBudgetExceeded` when releasing round ``round_id`` (0: the next
        one) would take ε past the budget."""
        ledger = self.privacy
        if ledger is not None and ledger.budget > 0:
            ledger.check(round_id or max(ledger.rounds(), default=0) + 1, self.settings.dp_noise_multiplier)

    def prepare_update(self, round_: pb.Round) -> dict[str, Any]:
        """Download, train, validate, encode; returns the pending record (already on disk).

        Order on disk: the round's global model, the local model, the encoded frames and the new
        residual, and last the pending record, which is the commit point: an agent killed before
        it trains the round again, one killed after it resends these very frames. The steps are
        the methods below; ``transform_update`` (given to the constructor) sees the update just
        before it is encoded.
        """
        r, config = round_.round_id, round_.config
        self.check_privacy_budget(r)  # before any training: a round over budget is never prepared
        data = self.check_federation(config)
        downloaded, global_arrays = self._download_global(round_)
        trained, scores, local = self._train_round(r, config, data, global_arrays)
        deltas, privacy = self._local_update(r, local, global_arrays)
        if self.transform_update is not None:
            deltas = self.transform_update(deltas)
        spec = codec.CodecSpec.from_message(config.codec)
        optimizer = _optimizer_arrays(trained.optimizer_state) if config.keep_optimizer_state else {}
        digest, chunks, diagnostics = self._encode_and_store(r, deltas, spec, config, optimizer)
        pending = {
            "sample_count": len(data.train),
            "metrics": _round_metrics(scores, trained),
            "validation_cases": int(scores.get("cases", len(data.val))),
            "extra": {**_per_class_dice(scores), **privacy, **diagnostics},
            "codec": {f: getattr(spec, f) for f in spec.__dataclass_fields__},
            "bytes_downloaded": downloaded.nbytes,
            "dense_bytes": int(sum(4 * a.size for a in global_arrays.values())),
            "digest": digest,
            "chunks": chunks,
        }
        self.state.save_pending(r, pending)
        return pending

    def _download_global(self, round_: pb.Round) -> tuple[Any, dict[str, np.ndarray]]:
        """The round's global model, downloaded (or rebuilt from a delta) into the state and checked."""
        r = round_.round_id
        downloaded = self.client.download(r, self.settings.site, self.state.path("global", r), base=self.held_model(r))
        self.reporter.event("download", round=r, bytes=downloaded.nbytes, delta_from=downloaded.delta_from_round)
        if downloaded.round_id != r:
            raise RuntimeError(f"asked for round {r}'s model, the aggregator sent round {downloaded.round_id}'s")
        if round_.global_model_digest and downloaded.digest != round_.global_model_digest:
            raise RuntimeError(
                f"round {r}: downloaded model digest {downloaded.digest[:16]}… differs from the round's "
                f"{round_.global_model_digest[:16]}…"
            )
        return downloaded, self.state.read_tensors("global", r)

    def _train_round(
        self, r: int, config: pb.TrainingConfig, data: SiteData, global_arrays: Mapping[str, np.ndarray]
    ) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
        """Train from the global model, validate, and write the local model: (train result, scores, local arrays)."""
        from model import DiceCELoss, check_window

        seed = self._seed(config) + r  # a new shuffle and augmentation draw every round
        seed_everything(seed)
        data.train.reseed(seed)
        model = model_from_config(config)
        patch = tuple(config.model.patch_size) or None
        if patch is not None:
            try:
                check_window(model, patch)
            except ValueError as exc:
                # The federation's window does not fit its own network: every site skips the round with this reason.
                raise TrainingError(f"the federation's model.patch_size: {exc}") from None
        load_arrays(model, global_arrays)
        model.to(self.device)
        # proto3 cannot tell an unset 0 from an explicit one; the aggregator always sends its
        # configured value (0 = cross-entropy only), so it is used as is.
        loss_fn = DiceCELoss(lambda_dice=float(config.lambda_dice))
        loader = make_loader(data.train, batch_size=config.batch_size or 1, shuffle=True, seed=seed,
                             num_workers=self.settings.num_workers)
        loop = LoopSettings(
            epochs=config.local_epochs or 1, lr=config.learning_rate or 1e-4, amp=self.settings.amp,
            fedprox_mu=config.fedprox_mu,
            # Aggregators from before TrainingConfig.optimizer send none: they meant Adam.
            optimizer=config.optimizer or "adam", momentum=config.momentum,
            max_grad_norm=float(config.clip_norm) if config.clip_norm > 0 else None,
        )
        optimizer_state = self._saved_optimizer_state(r) if config.keep_optimizer_state else None
        if self.settings.gpus > 1:
            from client_agent.distributed import train_distributed

            # One process per GPU trains; this process assembles and uploads the update once.
            trained = train_distributed(model, data.train, loop, processes=self.settings.gpus,
                                        batch_size=config.batch_size or 1, seed=seed, loss_fn=loss_fn,
                                        device_type=self.device.type, num_workers=self.settings.num_workers,
                                        work_dir=self.settings.state_dir)
        else:
            trained = train_local(model, loader, loop, device=self.device, loss_fn=loss_fn,
                                  optimizer_state=optimizer_state, progress=self.reporter.progress(r))
        scores = evaluate(model, data.val, device=self.device, num_classes=config.model.out_channels,
                          amp=self.settings.amp, roi_size=patch)
        local = dict(named_arrays(model))
        self.state.write_tensors("local", r, local.items())
        return trained, scores, local

    def _local_update(
        self, r: int, local: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The update θ_local − θ_global, clipped and noised when the site asks for differential privacy."""
        deltas = {name: local[name] - global_arrays[name] for name in global_arrays}
        if self.settings.dp_clip_norm <= 0:
            return deltas, {}
        # Clip and noise before the codec: error feedback then carries only the noised update,
        # never the raw one, so nothing unclipped reaches the wire in a later round either.
        deltas, report = clip_and_noise(deltas, self.settings.dp_clip_norm,
                                        self.settings.dp_noise_multiplier, np.random.default_rng())
        privacy = {"dp/clip_norm": report.clip_norm, "dp/noise_multiplier": report.noise_multiplier,
                   "dp/update_norm": report.norm, "dp/clip_scale": report.scale}
        ledger = self.privacy
        if ledger is not None:
            # Recorded before the update can leave the site: a crash can only over-count.
            privacy["dp/epsilon"] = ledger.record(r, self.settings.dp_noise_multiplier)
            privacy["dp/delta"] = ledger.delta
            privacy["dp/rounds"] = float(len(ledger.rounds()))
        return deltas, privacy

    def _saved_optimizer_state(self, r: int) -> dict[str, Any] | None:
        """The optimizer state stored with the residual in force (None: none kept yet)."""
        arrays = self.state.site_state()[1].get("optimizer")
        if not arrays:
            return None
        self.reporter.event("optimizer_state", round=r, restored=len(arrays), digest=_arrays_digest(arrays)[:16])
        return _optimizer_state(arrays)

    def _encode_and_store(
        self, r: int, deltas: Mapping[str, np.ndarray], spec: codec.CodecSpec, config: pb.TrainingConfig,
        optimizer: Mapping[str, np.ndarray],
    ) -> tuple[str, int, dict[str, float]]:
        """Encode the update with the site's residual; write its frames, then the new residual and the
        state kept with it (client_agent.state): (digest, chunks, the round's ``ef/*`` diagnostics).

        With ``config.momentum_correction`` = m > 0 the codec gets the velocity ``u = m u + Δ``
        instead of Δ, and the velocity is cleared where entries were sent (``client_agent.feedback``).
        """
        residual, kept_state = self.state.site_state()
        momentum = float(config.momentum_correction)
        update = feedback.accumulate_velocity(deltas, kept_state.get("velocity"), momentum) if momentum > 0 else dict(deltas)
        encoded = codec.encode_update(list(update.items()), spec, residual)
        counted = codec.DigestingFrames(encoded.frames)
        self.state.write_frames("pending", r, counted)
        sent = feedback.sent_masks(update, residual, encoded.residual)
        ages, at_send = feedback.advance_age(kept_state.get("age"), sent)
        diagnostics = feedback.diagnostics(deltas, update, residual, encoded.residual, sent, at_send,
                                           float(config.learning_rate))
        tensors: list[tuple[str, np.ndarray]] = list(encoded.residual.items())
        if momentum > 0:
            tensors += [(f"velocity/{n}", a) for n, a in feedback.mask_velocity(update, sent).items()]
        tensors += [(f"age/{n}", a) for n, a in ages.items()]
        tensors += [(f"optimizer/{n}", a) for n, a in optimizer.items()]
        self.state.write_tensors("residual", r, tensors)
        return counted.hexdigest(), counted.count, diagnostics


def _optimizer_arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torch optimizer's per-parameter state as ``"INDEX/KEY"`` arrays (SGD's momentum buffers,
    Adam's moments and step); the hyperparameters are not kept: each round's configuration sets them."""
    out: dict[str, np.ndarray] = {}
    for index, entry in state_dict.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                out[f"{int(index)}/{key}"] = value.detach().cpu().numpy()
    return out


def _optimizer_state(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of :func:`_optimizer_arrays`: ``{"state": {index: {key: tensor}}}``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, array in arrays.items():
        index, _, key = name.partition("/")
        state.setdefault(int(index), {})[key] = torch.from_numpy(np.array(array, copy=True))
    return {"state": state}


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()
