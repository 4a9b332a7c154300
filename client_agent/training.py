"""The training loop and evaluation, shared by a site's rounds and centralized training.

One loop, in named steps: :class:`LoopSettings` says how to train, :func:`build_optimizer` makes
(or resumes) Adam or SGD, :func:`train_epoch` makes one pass over a loader (bf16 autocast on CUDA
when asked, fp32 otherwise; optionally with the FedProx proximal term) and refuses a non-finite
loss, :func:`check_finite_weights` refuses a model whose weights went non-finite.
:func:`train_local` strings them together for a site's round; ``client_agent.centralized`` calls
:func:`train_epoch` once per epoch between validations. ``evaluate`` predicts every validation
volume whole (volumes are already on the fixed grid) and averages
:func:`model.segmentation_metrics` over cases with each case's own voxel spacing.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

# The one list of metric names (model.metrics uses it too), without importing MONAI here.
from protos.fedsegnet.v1.local_metrics import SEGMENTATION_METRIC_NAMES as METRIC_NAMES
from protos.fedsegnet.v1.training_options import OPTIMIZERS, check_optimizer

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZERS",
    "EpochProgress",
    "EpochStats",
    "LoopSettings",
    "TrainResult",
    "TrainingError",
    "autocast",
    "build_optimizer",
    "check_finite_weights",
    "check_optimizer",
    "evaluate",
    "make_optimizer",
    "pick_device",
    "seed_everything",
    "train_epoch",
    "train_local",
]


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


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``amp``; otherwise (and always on CPU) a no-op context.

    The one precision policy of training, validation and inference: bf16 needs no loss scaling;
    on CPU autocast would be slower and less exact than fp32.
    """
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


@dataclass(frozen=True)
class LoopSettings:
    """How the training loop runs; the same for a site's round and for centralized training.

    ``optimizer``/``momentum``: :func:`make_optimizer` (``"adam"``, or ``"sgd"`` with heavy-ball
    momentum; the name is checked when the optimizer is made, so that an agent told an unknown
    name by the aggregator skips the round). ``fedprox_mu > 0`` adds ``mu / 2 * ||w - w_global||^2``
    to the loss. ``max_grad_norm`` clips the gradients' global norm. ``amp``: bf16 autocast on
    CUDA, ignored on CPU.
    """

    epochs: int = 1
    lr: float = 1e-4
    amp: bool = False
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    fedprox_mu: float = 0.0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.fedprox_mu < 0:
            raise ValueError(f"fedprox_mu must be >= 0, got {self.fedprox_mu}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


@dataclass(frozen=True)
class EpochStats:
    """One pass over the loader: its mean loss, the steps and volumes it trained on, its duration."""

    loss: float
    steps: int
    volumes: int
    seconds: float


def build_optimizer(
    model: nn.Module, settings: LoopSettings, state: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """:func:`make_optimizer` over the trainable parameters, resumed from ``state`` where it fits.

    The settings' learning rate wins over the one saved in ``state`` (a round's configuration
    may change it).
    """
    opt = make_optimizer(
        settings.optimizer, [p for p in model.parameters() if p.requires_grad], lr=settings.lr,
        momentum=settings.momentum, weight_decay=settings.weight_decay,
    )
    if state:
        state = dict(state)
        if "param_groups" not in state:
            # Per-parameter state only (a site's saved momentum buffers): the groups are this round's.
            state["param_groups"] = opt.state_dict()["param_groups"]
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError) as exc:
            # A changed architecture makes old moments meaningless: start afresh rather than fail the round.
            logger.warning("optimizer state does not fit this model (%s); starting %s afresh", exc, settings.optimizer)
        misfit = [tuple(p.shape) for p, entry in opt.state.items() for v in entry.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape)]
        if misfit:
            logger.warning("optimizer state has tensors of other shapes than the model's (e.g. for %s); starting %s "
                           "afresh", misfit[0], settings.optimizer)
            opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = settings.lr
    return opt


def _steps_per_epoch(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@contextlib.contextmanager
def conv_layout(model: nn.Module, device: torch.device) -> Iterator[torch.memory_format | None]:
    """Train in the channels-last layout on a CPU; the model is back in the default layout after.

    oneDNN's 3D convolutions, their backward above all (two thirds of a step's time), run faster
    on ``(N, D, H, W, C)`` tensors than on ``(N, C, D, H, W)``: for the quick generalization
    experiment's Transformer U-Net at 48³, batch 2, on 2 CPU cores, 1.16x with one thread alone and
    1.2x each for three sites' processes sharing the cores (``benchmarks/conv_layout.py``;
    benchmarks/README.md). The results are the same numbers (the layout changes where values sit
    in memory, not what is computed). Weights go back to the default layout afterwards, for the
    codec and the checkpoints. On a GPU nothing changes, nor under DistributedDataParallel (its
    gradient buckets are laid out when it wraps the model). Yields the layout each batch must be
    put in, or None.
    """
    if device.type != "cpu" or isinstance(model, nn.parallel.DistributedDataParallel):
        yield None
        return
    # 5-D weights only; the Parameter objects stay the same. (Module.to takes memory_format at run
    # time; torch's type stubs do not list it.)
    model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    try:
        yield torch.channels_last_3d
    finally:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def _contiguous_state(state: dict[str, Any]) -> dict[str, Any]:
    """``opt.state_dict()`` with its buffers in the default layout (they follow their weights' layout)."""
    for entry in state["state"].values():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                entry[key] = value.contiguous()
    return state


def _train_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    opt: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prox_pairs: list[tuple[torch.nn.Parameter, torch.Tensor]],
    where: str,
    layout: torch.memory_format | None = None,
) -> tuple[float, int]:
    """One optimizer step on one batch; returns (its loss, its volume count). ``where``: "epoch E, step S"."""
    image = batch["image"].to(device, non_blocking=True)
    if layout is not None and image.dim() == 5:
        image = image.contiguous(memory_format=layout)
    label = batch["label"].to(device, non_blocking=True)
    opt.zero_grad(set_to_none=True)
    with autocast(device, settings.amp):
        logits = model(image)
        loss = loss_fn(logits, label)
    loss = loss.float()
    if settings.fedprox_mu > 0:
        loss = loss + 0.5 * settings.fedprox_mu * _proximal_term(prox_pairs)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"loss is {value} at {where} (cases {list(batch.get('case_id', []))}); "
            "lower the learning rate, check the input intensities, or try amp=False"
        )
    loss.backward()
    if settings.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        if not torch.isfinite(norm):
            raise TrainingError(f"gradient norm is {float(norm)} at {where}")
    opt.step()
    return value, int(image.shape[0])


def train_epoch(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    opt: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    epoch: int,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prox_pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None,
    progress: Callable[[EpochProgress], None] | None = None,
    started: float | None = None,
) -> EpochStats:
    """One pass of ``opt`` over ``loader`` (the model must be on ``device`` and in train mode).

    ``epoch`` (1-based, of ``settings.epochs``) names the place in error messages and progress
    reports; ``started`` is when training began (``time.perf_counter()``), from which
    :class:`EpochProgress` counts ``seconds``. Raises :class:`TrainingError` for a non-finite loss
    or gradient norm, or a loader that yields nothing.
    """
    epoch_start = time.perf_counter()
    started = epoch_start if started is None else started
    steps_in_epoch = _steps_per_epoch(loader)
    total, count, volumes = 0.0, 0, 0
    with conv_layout(model, torch.device(device)) as layout:
        for step, batch in enumerate(loader, start=1):
            value, n = _train_step(model, batch, opt, settings, device=device, loss_fn=loss_fn,
                                   prox_pairs=prox_pairs or [], where=f"epoch {epoch}, step {step}", layout=layout)
            total += value
            count += 1
            volumes += n
            if progress is not None:
                now = time.perf_counter()
                progress(EpochProgress(epoch, settings.epochs, step, steps_in_epoch, total / count, now - started,
                                       False, volumes, now - epoch_start))
    if count == 0:
        raise TrainingError(f"the training loader yielded no batch in epoch {epoch}; the site has no training data")
    logger.info("epoch %d/%d: loss %.4f (%d steps)", epoch, settings.epochs, total / count, count)
    if progress is not None:
        now = time.perf_counter()
        progress(EpochProgress(epoch, settings.epochs, count, steps_in_epoch, total / count, now - started, True,
                               volumes, now - epoch_start))
    return EpochStats(loss=total / count, steps=count, volumes=volumes, seconds=time.perf_counter() - epoch_start)


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`TrainingError` when any parameter holds NaN or Inf: such a model must never be used."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"{len(bad)} parameter tensor(s) hold non-finite values after training, e.g. {bad[:3]}")


def train_local(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    settings: LoopSettings,
    *,
    device: torch.device | str,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    global_params: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    progress: Callable[[EpochProgress], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``settings.epochs`` passes over ``loader`` (:func:`train_epoch`).

    ``loss_fn(logits (B, K, D, H, W), label (B, 1, D, H, W) int64) -> scalar``. With
    ``settings.fedprox_mu > 0`` the proximal term pulls towards ``global_params`` (name -> tensor),
    by default the weights the model holds when training starts, i.e. the global model just
    downloaded. ``optimizer_state`` resumes the optimizer's state (Adam's moments, SGD's momentum
    buffers) from an earlier round.

    Raises :class:`TrainingError` naming the epoch and step when the loss or, at the end, any
    weight is non-finite (such a model must never be uploaded), or for an unknown optimizer.
    """
    device = torch.device(device)
    model.to(device)
    model.train()
    opt = build_optimizer(model, settings, optimizer_state)
    prox_pairs = _prepare_global(model, global_params, device) if settings.fedprox_mu > 0 else []
    start = time.perf_counter()
    epochs = [
        train_epoch(model, loader, opt, settings, epoch=epoch, device=device, loss_fn=loss_fn,
                    prox_pairs=prox_pairs, progress=progress, started=start)
        for epoch in range(1, settings.epochs + 1)
    ]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    check_finite_weights(model)
    return TrainResult(
        epoch_losses=[e.loss for e in epochs],
        steps=sum(e.steps for e in epochs),
        volumes=sum(e.volumes for e in epochs),
        seconds=seconds,
        optimizer_state=_contiguous_state(opt.state_dict()),
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
    roi_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Segment every volume whole and average the metrics over cases.

    ``roi_size``: the window the network was trained on (``[model] patch_size``); volumes larger
    than it are predicted by overlapping windows of it (:func:`model.window_logits`), as at
    inference. None: one pass over the whole volume.

    Returns ``{"dice", "iou", "hd95", "precision", "recall": float (means over cases of the
    per-case class means), "per_class": {"1": {metric: mean over cases}, …}, "cases": n}``,
    plus ``"loss"`` (mean over cases) when ``loss_fn`` is given and ``"regions": {name: {metric}}``
    when ``region_fn`` (e.g. :func:`client_agent.data.regions_from_labels`) maps a ``(D, H, W)``
    class map to boolean region masks (BraTS ET/TC/WT). HD95 is in mm, using each case's spacing.
    """
    from model import segmentation_metrics, window_logits

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
                with autocast(device, amp):
                    logits = window_logits(model, image, roi_size)
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
