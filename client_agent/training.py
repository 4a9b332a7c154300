"""Local training and evaluation on a site's data.

``train_local`` runs real Adam or SGD steps on the site's loader (bf16 autocast on CUDA when asked, fp32
otherwise), optionally with the FedProx proximal term, and refuses to return a model whose loss or
weights went non-finite. ``evaluate`` predicts every validation volume whole (volumes are already
on the fixed grid) and averages :func:`model.segmentation_metrics` over cases with each case's
own voxel spacing.

Batches are dicts as :func:`client_agent.data.make_loader` yields them: ``image`` float32
``(B, C, D, H, W)``, ``label`` int64 ``(B, 1, D, H, W)``, ``spacing`` ``(B, 3)`` mm/voxel,
``case_id`` list of str.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "EpochProgress",
    "TrainResult",
    "TrainingError",
    "evaluate",
    "pick_device",
    "seed_everything",
    "train_local",
]

METRIC_NAMES = ("dice", "iou", "hd95", "precision", "recall")


class TrainingError(RuntimeError):
    """Local training cannot produce a usable update (non-finite loss or weights, bad arguments)."""


# --------------------------------------------------------------------------------------------
# Devices and seeds
# --------------------------------------------------------------------------------------------

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def pick_device(requested: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU. ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` are forced.

    Asking for a GPU that is not there raises :class:`TrainingError` saying what is available,
    rather than silently training on the CPU for days.
    """
    req = str(requested).strip().lower()
    if not _DEVICE.match(req):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {requested!r}")
    if req == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(
                f"device {requested!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use --device cpu or auto"
            )
        index = int(req.split(":")[1]) if ":" in req else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise TrainingError(f"device {requested!r} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if req == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TrainingError("device 'mps' requested but Apple MPS is not available; use cpu or auto")
    return torch.device(req)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) for reproducible runs."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochProgress:
    """Where training is: reported after every step and once more at each epoch's end (``epoch_done``).

    ``epoch`` is 1-based; ``loss`` is the mean loss of this epoch's steps so far; ``seconds`` counts
    from the start of training, ``epoch_seconds`` from the start of this epoch, in which
    ``epoch_volumes`` volumes have been trained on so far (so ``epoch_volumes / epoch_seconds`` is
    the epoch's throughput whatever the batch size and however many epochs came before).
    """

    epoch: int
    epochs: int
    step: int
    steps_in_epoch: int | None
    loss: float
    seconds: float
    epoch_done: bool
    epoch_volumes: int = 0
    epoch_seconds: float = 0.0

    @property
    def volumes_per_s(self) -> float:
        """Volumes trained per second in this epoch so far (0 before any time has passed)."""
        return self.epoch_volumes / self.epoch_seconds if self.epoch_seconds > 0 else 0.0


@dataclass
class TrainResult:
    """What a local training run did. ``optimizer_state`` is the optimizer's, to resume from next round."""

    epoch_losses: list[float]
    steps: int
    volumes: int
    seconds: float
    optimizer_state: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def volumes_per_s(self) -> float:
        return self.volumes / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    # bf16 needs no loss scaling; on CPU autocast would be slower and less exact than fp32.
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _snapshot_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _prepare_global(
    model: nn.Module, global_params: Mapping[str, torch.Tensor] | None, device: torch.device
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Pairs (parameter, its global value) for the proximal term; checks names and shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    source = _snapshot_params(model) if global_params is None else global_params
    missing = sorted(set(params) - set(source))
    if missing:
        raise TrainingError(f"global_params lacks {len(missing)} trainable parameter(s) of the model, e.g. {missing[:3]}")
    pairs = []
    for name, p in params.items():
        g = torch.as_tensor(source[name])
        if tuple(g.shape) != tuple(p.shape):
            raise TrainingError(f"global_params[{name!r}] has shape {tuple(g.shape)}, the model's is {tuple(p.shape)}")
        pairs.append((p, g.detach().to(device=device, dtype=p.dtype)))
    return pairs


def _proximal_term(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([(p - g).pow(2).sum() for p, g in pairs]).sum()


OPTIMIZERS = ("adam", "sgd")


def check_optimizer(name: str, momentum: float) -> None:
    """Raise ValueError unless ``name`` is one of :data:`OPTIMIZERS` and ``momentum`` fits it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if momentum and name != "sgd":
        raise ValueError(f"momentum applies to optimizer 'sgd' only, got momentum={momentum} with {name!r}")


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The local optimizer a round's ``TrainingConfig.optimizer`` names.

    ``"adam"``: steps of about ``lr`` in every entry whatever its gradient, which trains fast but
    gives round updates whose energy is spread over all entries, so a top-1% codec sends ~6% of a
    round's update (``benchmarks/update_energy.py``). ``"sgd"`` (heavy-ball ``momentum`` in
    [0, 1)): updates are sums of gradients whose largest 1% hold 70-99% of their energy, in a few
    tensors; a global top-1% codec sends ~88% of them.
    """
    if name not in OPTIMIZERS:
        # A TrainingError, not a ValueError: the name comes from the aggregator, and an agent that
        # cannot run it skips the round with this reason instead of stopping.
        raise TrainingError(f"unknown optimizer {name!r}; this site runs {list(OPTIMIZERS)} (upgrade the client agent?)")
    check_optimizer(name, momentum)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def train_local(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    epochs: int,
    lr: float = 1e-4,
    device: torch.device | str,
    amp: bool,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fedprox_mu: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    progress: Callable[[EpochProgress], None] | None = None,
    optimizer: str = "adam",
    momentum: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``loader`` with ``optimizer``
    (:func:`make_optimizer`: ``"adam"`` or ``"sgd"`` with ``momentum``).

    ``loss_fn(logits (B, K, D, H, W), label (B, 1, D, H, W) int64) -> scalar``. With
    ``fedprox_mu > 0`` the loss gains ``mu / 2 * ||w - w_global||^2`` over the trainable
    parameters; ``global_params`` (name -> tensor) defaults to the weights the model holds when
    training starts, i.e. the global model just downloaded. ``optimizer_state`` resumes the
    optimizer's state (Adam's moments, SGD's momentum buffers) from an earlier round. ``amp`` turns
    on bf16 autocast on CUDA and is ignored on CPU.

    Raises :class:`TrainingError` naming the epoch and step when the loss or, at the end, any
    weight is non-finite (such a model must never be uploaded), or for an unknown optimizer.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if fedprox_mu < 0:
        raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    device = torch.device(device)
    model.to(device)
    model.train()
    opt = make_optimizer(
        optimizer, [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
        weight_decay=weight_decay,
    )
    if optimizer_state:
        try:
            opt.load_state_dict(dict(optimizer_state))
        except (ValueError, KeyError) as exc:
            # A changed architecture makes old moments meaningless: start afresh rather than fail the round.
            logger.warning("optimizer state does not fit this model (%s); starting %s afresh", exc, optimizer)
        for group in opt.param_groups:
            group["lr"] = lr  # the round's configuration wins over the saved state
    prox_pairs = _prepare_global(model, global_params, device) if fedprox_mu > 0 else []

    try:
        steps_in_epoch: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_in_epoch = None
    epoch_losses: list[float] = []
    steps = volumes = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        total, count, epoch_volumes = 0.0, 0, 0
        epoch_start = time.perf_counter()
        for step, batch in enumerate(loader, start=1):
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                logits = model(image)
                loss = loss_fn(logits, label)
            loss = loss.float()
            if fedprox_mu > 0:
                loss = loss + 0.5 * fedprox_mu * _proximal_term(prox_pairs)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at epoch {epoch}, step {step} (cases {list(batch.get('case_id', []))}); "
                    "lower the learning rate, check the input intensities, or try amp=False"
                )
            loss.backward()
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                if not torch.isfinite(norm):
                    raise TrainingError(f"gradient norm is {float(norm)} at epoch {epoch}, step {step}")
            opt.step()
            total += value
            count += 1
            steps += 1
            volumes += int(image.shape[0])
            epoch_volumes += int(image.shape[0])
            if progress is not None:
                now = time.perf_counter()
                progress(EpochProgress(epoch, epochs, step, steps_in_epoch, total / count, now - start, False,
                                       epoch_volumes, now - epoch_start))
        if count == 0:
            raise TrainingError(f"the training loader yielded no batch in epoch {epoch}; the site has no training data")
        epoch_losses.append(total / count)
        logger.info("epoch %d/%d: loss %.4f (%d steps)", epoch, epochs, total / count, count)
        if progress is not None:
            now = time.perf_counter()
            progress(EpochProgress(epoch, epochs, count, steps_in_epoch, total / count, now - start, True,
                                   epoch_volumes, now - epoch_start))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"{len(bad)} parameter tensor(s) hold non-finite values after training, e.g. {bad[:3]}")
    return TrainResult(
        epoch_losses=epoch_losses,
        steps=steps,
        volumes=volumes,
        seconds=seconds,
        optimizer_state=opt.state_dict(),
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _batches(data: Dataset | DataLoader | Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:  # type: ignore[type-arg]
    """A dataset's items as batches of one; a loader's batches as they come."""
    if isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
        for i in range(len(data)):
            item = data[i]
            yield {
                "image": item["image"][None],
                "label": item["label"][None],
                "spacing": torch.as_tensor(item["spacing"])[None],
                "case_id": [item.get("case_id", str(i))],
            }
    else:
        yield from data  # type: ignore[misc]


def _mean_ignoring_nan(values: list[float]) -> float:
    # NaN means "undefined for that case" (e.g. a class absent from both prediction and truth):
    # such cases do not count toward the mean; infinities do (an empty prediction of a present class).
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _average(case_metrics: list[Mapping[str, float]]) -> dict[str, float]:
    keys = [k for k in METRIC_NAMES if any(k in m for m in case_metrics)]
    return {k: _mean_ignoring_nan([float(m[k]) for m in case_metrics if k in m]) for k in keys}


def evaluate(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader | Iterable[Mapping[str, Any]],  # type: ignore[type-arg]
    *,
    device: torch.device | str,
    num_classes: int,
    amp: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    include_background: bool = False,
    region_fn: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Segment every volume whole and average the metrics over cases.

    Returns ``{"dice", "iou", "hd95", "precision", "recall": float (means over cases of the
    per-case class means), "per_class": {"1": {metric: mean over cases}, …}, "cases": n}``,
    plus ``"loss"`` (mean over cases) when ``loss_fn`` is given and ``"regions": {name: {metric}}``
    when ``region_fn`` (e.g. :func:`client_agent.data.regions_from_labels`) maps a ``(D, H, W)``
    class map to boolean region masks (BraTS ET/TC/WT). HD95 is in mm, using each case's spacing.
    """
    from model import segmentation_metrics

    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    case_means: list[Mapping[str, float]] = []
    per_class: dict[str, list[Mapping[str, float]]] = {}
    regions: dict[str, list[Mapping[str, float]]] = {}
    losses: list[float] = []
    try:
        with torch.inference_mode():
            for batch in _batches(dataset_or_loader):
                image = batch["image"].to(device)
                label = batch["label"].to(device)
                with _autocast(device, amp):
                    logits = model(image)
                logits = logits.float()
                if loss_fn is not None:
                    # The loss is a batch mean; weight it by the batch size to get a mean over cases.
                    losses.extend([float(loss_fn(logits, label))] * int(image.shape[0]))
                preds = logits.argmax(dim=1).cpu().numpy()
                targets = label[:, 0].cpu().numpy()
                spacings = torch.as_tensor(batch["spacing"]).reshape(-1, 3).cpu().numpy()
                for pred, target, spacing in zip(preds, targets, spacings):
                    sp = tuple(float(s) for s in spacing)
                    metrics = segmentation_metrics(
                        pred, target, num_classes=num_classes, spacing=sp, include_background=include_background
                    )
                    case_means.append(metrics["mean"])
                    for cls, values in metrics["per_class"].items():
                        per_class.setdefault(str(cls), []).append(values)
                    if region_fn is not None:
                        pred_regions, true_regions = region_fn(pred), region_fn(target)
                        for name, mask in true_regions.items():
                            m = segmentation_metrics(
                                pred_regions[name].astype(np.int64), mask.astype(np.int64), num_classes=2, spacing=sp
                            )
                            regions.setdefault(name, []).append(m["per_class"]["1"])
    finally:
        model.train(was_training)
    if not case_means:
        raise ValueError("evaluate got no volume: the validation set is empty")
    result: dict[str, Any] = _average(case_means)
    result["per_class"] = {cls: _average(values) for cls, values in sorted(per_class.items(), key=lambda kv: int(kv[0]))}
    if regions:
        result["regions"] = {name: _average(values) for name, values in regions.items()}
    if loss_fn is not None:
        result["loss"] = float(np.mean(losses))
    result["cases"] = len(case_means)
    return result
