"""The site's lifecycle: join → wait for an open round → download → train → validate → encode → upload.

:func:`run_agent` loops until the federation is over. Every step that must survive a restart
writes to the site's state directory first (``state.py``): the downloaded global model, the
encoded update and its new residual before the upload, the receipt after it. A restarted agent
therefore resends exactly the same bytes for an interrupted round (the aggregator counts it once)
and never trains or submits a round twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

import codec
from client_agent.data import DataError, SiteData, build_datasets, discover_cases, make_loader
from client_agent.reporting import Reporter
from client_agent.state import SiteState
from client_agent.training import evaluate, pick_device, seed_everything, train_local
from client_agent.transport import AggregatorClient, Refused
from protos.fedsegnet.v1 import aggregator_pb2 as pb

log = logging.getLogger("client_agent")

METRICS = ("dice", "hd95", "iou", "precision", "recall")


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
    label_map: str | None = None
    on_bad_file: str = "skip"
    num_workers: int = 0
    poll_initial_s: float = 0.5
    poll_max_s: float = 10.0
    max_rounds: int = 0  # 0: until the federation finishes
    seed: int | None = None  # None: the federation's seed


@dataclass
class RoundOutcome:
    round_id: int
    submitted: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    dense_bytes: int = 0
    seconds: float = 0.0


def check_data(settings: AgentSettings) -> int:
    """Fail fast, before contacting the aggregator, on a folder that holds no usable case."""
    cases = discover_cases(settings.data)
    if not cases:
        raise DataError(f"{settings.data}: no image/label pairs found")
    return len(cases)


def model_from_config(config: pb.TrainingConfig) -> torch.nn.Module:
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
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach().cpu().numpy()


def load_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    missing = set(state) ^ set(arrays)
    if missing:
        raise ValueError(f"global model and local network disagree on tensors: {sorted(missing)[:5]}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in state})


class SiteAgent:
    """One site's agent. The loop is :meth:`run`; :meth:`run_round` does one round."""

    def __init__(self, settings: AgentSettings, client: AggregatorClient, reporter: Reporter) -> None:
        self.settings = settings
        self.client = client
        self.reporter = reporter
        self.state = SiteState(settings.state_dir)
        self.device = pick_device(settings.device)
        self._data: SiteData | None = None
        self._data_key: tuple[Any, ...] = ()

    # -- data --------------------------------------------------------------------------------
    def site_data(self, config: pb.TrainingConfig) -> SiteData:
        key = (tuple(config.model.img_size), config.model.out_channels, config.seed)
        if self._data is None or key != self._data_key:
            self._data = build_datasets(
                self.settings.data,
                spatial_size=tuple(config.model.img_size),
                num_classes=config.model.out_channels,
                label_map=self.settings.label_map,
                val_fraction=self.settings.val_fraction,
                seed=self._seed(config),
                augment=self.settings.augment,
                cache_dir=self.settings.cache_dir,
                on_error=self.settings.on_bad_file,  # type: ignore[arg-type]
            )
            self._data_key = key
            if self._data.in_channels != config.model.in_channels:
                raise DataError(
                    f"{self.settings.data}: images have {self._data.in_channels} channel(s), the federation's "
                    f"model takes {config.model.in_channels}"
                )
        return self._data

    def _seed(self, config: pb.TrainingConfig) -> int:
        return config.seed if self.settings.seed is None else self.settings.seed

    # -- the loop ----------------------------------------------------------------------------
    def run(self, *, should_stop: Callable[[], bool] = lambda: False) -> int:
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
        rounds_done = 0
        delay = self.settings.poll_initial_s
        while not should_stop():
            current = self.client.get_round(self.settings.site)
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
            time.sleep(delay)
            delay = min(self.settings.poll_max_s, delay * 1.5)
        return 0

    def run_round(self, round_: pb.Round) -> RoundOutcome:
        r = round_.round_id
        started = time.monotonic()
        pending = self.state.pending(r)
        if pending is None:
            pending = self._train_and_encode(round_)
        header = pb.UpdateHeader(
            site=self.settings.site,
            round_id=r,
            sample_count=pending["sample_count"],
            metrics=pb.LocalMetrics(
                **{k: pending["metrics"][k] for k in (*METRICS, "train_loss", "train_seconds")},
                validation_cases=pending["validation_cases"],
                extra=pending["extra"],
            ),
            codec=pb.CodecSpec(**codec.CodecSpec(**pending["codec"]).to_fields()),
            bytes_downloaded=pending["bytes_downloaded"],
        )
        outcome = RoundOutcome(
            r, False, metrics=pending["metrics"], bytes_down=pending["bytes_downloaded"],
            dense_bytes=pending["dense_bytes"],
        )
        try:
            receipt = self.client.submit(header, self.state.path("pending", r), pending["digest"], pending["chunks"])
        except Refused as exc:
            # The aggregator's answer is final for this round: log it and go on with the next.
            log.warning("round %d: update refused by the aggregator: %s", r, exc)
            self.state.finish_round(r, receipt=None, refusal=str(exc))
            outcome.reason = str(exc)
        else:
            self.state.finish_round(
                r, receipt={"digest": receipt.digest, "bytes": receipt.bytes_received, "duplicate": receipt.duplicate}
            )
            outcome.submitted = True
            outcome.bytes_up = receipt.bytes_received
        outcome.seconds = time.monotonic() - started
        return outcome

    def _train_and_encode(self, round_: pb.Round) -> dict[str, Any]:
        r, config = round_.round_id, round_.config
        data = self.site_data(config)
        downloaded = self.client.download(r, self.settings.site, self.state.path("global", r))
        if downloaded.round_id != r:
            raise RuntimeError(f"asked for round {r}'s model, the aggregator sent round {downloaded.round_id}'s")
        global_arrays = self.state.read_tensors("global", r)

        seed = self._seed(config) + r  # a new shuffle and augmentation draw every round
        seed_everything(seed)
        data.train.reseed(seed)
        model = model_from_config(config)
        load_arrays(model, global_arrays)
        model.to(self.device)
        from model import DiceCELoss

        loss_fn = DiceCELoss(lambda_dice=config.lambda_dice or 0.5)
        loader = make_loader(data.train, batch_size=config.batch_size or 1, shuffle=True, seed=seed,
                             num_workers=self.settings.num_workers)
        trained = train_local(
            model, loader, epochs=config.local_epochs or 1, lr=config.learning_rate or 1e-4, device=self.device,
            amp=self.settings.amp, loss_fn=loss_fn, fedprox_mu=config.fedprox_mu,
            progress=self.reporter.progress(r, len(data.train)),
        )
        scores = evaluate(model, data.val, device=self.device, num_classes=config.model.out_channels)

        local = dict(named_arrays(model))
        self.state.write_tensors("local", r, local.items())
        spec = codec.CodecSpec.from_message(config.codec)
        deltas = [(name, local[name] - global_arrays[name]) for name in global_arrays]
        encoded = codec.encode_update(deltas, spec, self.state.residual())
        sha = hashlib.sha256()
        chunks = 0

        def counted() -> Iterator[bytes]:
            nonlocal chunks
            for frame in encoded.frames:
                sha.update(frame)
                chunks += 1
                yield frame

        self.state.write_frames("pending", r, counted())
        self.state.write_tensors("residual", r, encoded.residual.items())
        metrics = {k: float(scores[k]) for k in METRICS}
        metrics["train_loss"] = float(trained.final_loss)
        metrics["train_seconds"] = float(trained.seconds)
        extra = {f"dice/{c}": float(v["dice"]) for c, v in scores.get("per_class", {}).items()}
        pending = {
            "sample_count": len(data.train),
            "metrics": metrics,
            "validation_cases": int(scores.get("cases", len(data.val))),
            "extra": extra,
            "codec": {f: getattr(spec, f) for f in spec.__dataclass_fields__},
            "bytes_downloaded": downloaded.nbytes,
            "dense_bytes": int(sum(4 * a.size for a in global_arrays.values())),
            "digest": sha.hexdigest(),
            "chunks": chunks,
        }
        self.state.save_pending(r, pending)
        return pending
