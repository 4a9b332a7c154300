"""Conversions between the aggregator's domain values and ``fedsegnet.v1`` messages."""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from aggregator_service.config import FederationConfig
from aggregator_service.errors import InvalidUpdate
from aggregator_service.rounds import FINISHED, METRIC_NAMES, RoundView, UpdateCommit, UpdateHeader
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1.local_metrics import MAX_EXTRA_METRICS

_STATES = {"open": pb.ROUND_STATE_OPEN, FINISHED: pb.ROUND_STATE_FINISHED}


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def training_config_to_proto(config: FederationConfig, round_id: int = 1) -> pb.TrainingConfig:
    """What sites train round ``round_id`` with (the learning rate follows ``training.lr_schedule``)."""
    t, m = config.training, config.model
    return pb.TrainingConfig(
        model=pb.ModelSpec(
            architecture=m.architecture,
            in_channels=m.in_channels,
            out_channels=m.out_channels,
            img_size=list(m.img_size),
            options_json=json.dumps(dict(m.options), sort_keys=True),
            spacing_mm=float(m.spacing_mm),
            patch_size=list(m.patch_size),
        ),
        local_epochs=t.local_epochs,
        learning_rate=t.learning_rate_at(round_id, config.rounds),
        batch_size=t.batch_size,
        fedprox_mu=t.fedprox_mu,
        lambda_dice=t.lambda_dice,
        codec=pb.CodecSpec(**config.codec_at(round_id).to_fields()),
        seed=t.seed,
        optimizer=t.optimizer,
        momentum=t.momentum,
        momentum_correction=t.momentum_correction,
        clip_norm=t.clip_norm,
        keep_optimizer_state=t.keep_optimizer_state,
        augmentation=t.augmentation,
    )


def round_to_proto(view: RoundView, config: FederationConfig) -> pb.Round:
    return pb.Round(
        round_id=view.round_id,
        state=_STATES.get(view.state, pb.ROUND_STATE_UNSPECIFIED),
        deadline=timestamp(view.deadline),
        min_clients=view.min_clients,
        max_clients=view.max_clients,
        total_rounds=view.total_rounds,
        config=training_config_to_proto(config, view.round_id),
        global_model_digest=view.global_model_digest,
        submitted_sites=list(view.submitted_sites),
    )


def metrics_to_proto(metrics: Mapping[str, float], extra: Mapping[str, float], cases: int = 0) -> pb.LocalMetrics:
    return pb.LocalMetrics(
        **{k: float(v) for k, v in metrics.items() if k in METRIC_NAMES},
        validation_cases=cases,
        extra={k: float(v) for k, v in extra.items()},
    )


def metrics_from_proto(msg: pb.LocalMetrics) -> tuple[dict[str, float], dict[str, float], int]:
    return {name: getattr(msg, name) for name in METRIC_NAMES}, dict(msg.extra), msg.validation_cases


def header_from_proto(msg: pb.UpdateHeader) -> UpdateHeader:
    metrics, extra, cases = metrics_from_proto(msg.metrics)
    if cases:
        extra = {**extra, "validation_cases": float(cases)}
    return UpdateHeader(
        site=msg.site,
        round_id=msg.round_id,
        sample_count=msg.sample_count,
        metrics=metrics,
        extra_metrics=extra,
        codec={f.name: v for f, v in msg.codec.ListFields()},
        bytes_downloaded=msg.bytes_downloaded,
    )


def upload_parts(requests: Iterator[pb.SubmitUpdateRequest]) -> Iterator[bytes | UpdateCommit]:
    """The messages after the header, as frames and a commit; anything else is a protocol error."""
    for request in requests:
        kind = request.WhichOneof("part")
        if kind == "frame":
            yield request.frame
        elif kind == "commit":
            yield UpdateCommit(chunk_count=request.commit.chunk_count, digest=request.commit.digest)
        elif kind == "header":
            raise InvalidUpdate("a second header arrived in the same upload stream", reason="bad_stream")
        else:
            raise InvalidUpdate("an upload message with no part set", reason="bad_stream")


def site_metrics_to_proto(site: Mapping[str, Any]) -> pb.SiteRoundMetrics:
    """One site's row of ``GetRoundMetrics``.

    Bounded whatever the store holds: uploads carry at most ``MAX_EXTRA_METRICS`` extra metrics,
    and a record stored before that limit keeps only its first ``MAX_EXTRA_METRICS`` by name here
    (the record itself is unchanged), so two sites can never push the response past gRPC's limit.
    """
    stored = site.get("extra_metrics", {})
    cases_value = stored.get("validation_cases", 0)
    extra = dict(sorted((k, v) for k, v in stored.items() if k != "validation_cases")[:MAX_EXTRA_METRICS])
    cases = int(cases_value) if math.isfinite(cases_value) and 0 <= cases_value < 2**32 else 0
    return pb.SiteRoundMetrics(
        site=site["site"],
        sample_count=site["sample_count"],
        metrics=metrics_to_proto(site.get("metrics", {}), extra, cases),
        weight=site.get("weight", 0.0),
        bytes_uploaded=site.get("bytes", 0),
        bytes_downloaded=site.get("bytes_downloaded", 0),
        update_norm=site.get("update_norm", 0.0),
        weight_factors={k: float(v) for k, v in site.get("weight_factors", {}).items()},
    )
